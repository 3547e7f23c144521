// forkattn._C: binding lines only. The public API is python/forkattn.
#include <torch/extension.h>

#include "attention.h"
#include "build.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "forkattn native kernels (use the forkattn package, not this module)";
  m.def("compiled_with_cuda", &forkattn::compiled_with_cuda);
  m.def("compiled_torch_version", &forkattn::compiled_torch_version);
  m.def("attention_fwd_cpu", &forkattn::attention_fwd_cpu, "fused attention forward (CPU): (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"));
  m.def("attention_bwd_cpu", &forkattn::attention_bwd_cpu, "fused attention backward (CPU): (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"));
#ifdef FORKATTN_WITH_CUDA
  m.def("attention_fwd_cuda", &forkattn::attention_fwd_cuda, "fused attention forward (CUDA): (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"));
  m.def("attention_bwd_cuda", &forkattn::attention_bwd_cuda, "fused attention backward (CUDA): (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"));
  m.def("attention_varlen_fwd_cuda", &forkattn::attention_varlen_fwd_cuda,
        "packed varlen attention forward (CUDA): (out, lse [H, total_q])", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"));
  m.def("attention_varlen_bwd_cuda", &forkattn::attention_varlen_bwd_cuda,
        "packed varlen attention backward (CUDA): (dq, dk, dv)", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"));
#endif
}
