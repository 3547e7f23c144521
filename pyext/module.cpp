// forkattn._C: binding lines only. The public API is python/forkattn.
#include <torch/extension.h>

#include "attention.h"
#include "build.h"
#include "mlm.h"

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
  // MLM masking: writes out_ids and out_labels in place (see csrc/mlm.h).
#define FORKATTN_MLM_PYARGS                                                                              \
  py::arg("input_ids"), py::arg("out_ids"), py::arg("out_labels"), py::arg("special_tokens_mask"),       \
      py::arg("attention_mask"), py::arg("labels"), py::arg("word_ids"), py::arg("special_ids"),         \
      py::arg("excluded_ids"), py::arg("vocab_size"), py::arg("mask_token_id"), py::arg("seed"),         \
      py::arg("t_select"), py::arg("t_mask"), py::arg("t_random"), py::arg("n_random"), py::arg("exact"), \
      py::arg("min_masked")
  m.def("mlm_mask_cpu", &forkattn::mlm_mask_cpu, "MLM 80/10/10 masking (CPU)", FORKATTN_MLM_PYARGS);
#ifdef FORKATTN_WITH_CUDA
  m.def("mlm_mask_cuda", &forkattn::mlm_mask_cuda, "MLM 80/10/10 masking (CUDA)", FORKATTN_MLM_PYARGS);
#endif
}
