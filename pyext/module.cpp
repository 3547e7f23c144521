// forkattn._C: binding lines only. The public API is python/forkattn.
#include <torch/extension.h>

#include "attention.h"
#include "build.h"
#include "decode.h"

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
  m.def("kv_append_cpu", &forkattn::kv_append_cpu, "KV-cache append in place (CPU)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"), py::arg("k"), py::arg("v"),
        py::arg("max_seqlen"));
  m.def("decode_attention_cpu", &forkattn::decode_attention_cpu, "decode attention over a KV cache (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"),
        py::arg("o_partial"), py::arg("lse_partial"), py::arg("max_seqlen"), py::arg("num_splits"), py::arg("scale"));
#ifdef FORKATTN_WITH_CUDA
  m.def("kv_append_cuda", &forkattn::kv_append_cuda, "KV-cache append in place (CUDA)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"), py::arg("k"), py::arg("v"),
        py::arg("max_seqlen"));
  m.def("decode_attention_cuda", &forkattn::decode_attention_cuda, "split-KV decode attention (CUDA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"),
        py::arg("o_partial"), py::arg("lse_partial"), py::arg("max_seqlen"), py::arg("num_splits"), py::arg("scale"));
#endif
}
