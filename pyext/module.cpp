// forkattn._C: binding lines only. The public API is python/forkattn.
#include <torch/extension.h>

#include "attention.h"
#include "build.h"
#include "cpu_dispatch.h"
#include "mlm.h"
#include "decode.h"
#include "disentangled.h"
#include "encoder.h"
#include "gemm.h"
#include "gemv.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "forkattn native kernels (use the forkattn package, not this module)";
  m.def("compiled_with_cuda", &forkattn::compiled_with_cuda);
  m.def("cpu_isas_compiled", &forkattn::cpu::compiled_isas, "the per-ISA variants of the CPU kernels compiled in");
  m.def("cpu_isas_supported", &forkattn::cpu::supported_isas,
        "the per-ISA variants this CPU executes (its instruction sets), compiled in or not");
  m.def("cpu_isa", [] { return std::string(forkattn::cpu::isa_name(forkattn::cpu::chosen_isa())); },
        "the CPU kernel variant in use (chosen at the first call: csrc/cpu_dispatch.h)");
  m.def("_choose_cpu_isa", &forkattn::cpu::choose_isa,
        "re-choose the CPU kernel variant as if FORKATTN_CPU_CAPABILITY=request ('' = unset); tests and benchmarks",
        py::arg("request"));
  m.def("linear_split_cpu", &forkattn::linear_split_cpu,
        "x @ W (+ bias) with W's output columns split across threads (one-row GEMMs, csrc/gemv.h)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("w_in_out"));
  m.def("attention_fwd_cpu", &forkattn::attention_fwd_cpu, "fused attention forward (CPU): (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_bwd_cpu", &forkattn::attention_bwd_cpu, "fused attention backward (CPU): (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_varlen_fwd_cpu", &forkattn::attention_varlen_fwd_cpu,
        "fused attention over packed sequences, forward (CPU): (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_varlen_bwd_cpu", &forkattn::attention_varlen_bwd_cpu,
        "fused attention over packed sequences, backward (CPU): (dq, dk, dv)", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("_tile_gemm_cpu", &forkattn::tile_gemm_cpu,
        "tests: the CPU attention kernels' tile matmul, column-major BLAS convention, in place on c (returned)",
        py::arg("ta"), py::arg("tb"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("alpha"), py::arg("a"),
        py::arg("lda"), py::arg("b"), py::arg("ldb"), py::arg("beta"), py::arg("c"), py::arg("ldc"));
  // BERT encoder-layer epilogues, in place on x (see csrc/encoder.h).
  m.def("bias_gelu_cpu", &forkattn::bias_gelu_cpu, "x = gelu(x + bias) in place (CPU, fp32)", py::arg("x"),
        py::arg("bias"));
  m.def("bias_residual_layernorm_cpu", &forkattn::bias_residual_layernorm_cpu,
        "x = layer_norm(x + bias + residual) * weight + ln_bias in place (CPU, fp32)", py::arg("x"),
        py::arg("residual"), py::arg("bias"), py::arg("weight"), py::arg("ln_bias"), py::arg("eps"));
  m.def("encoder_layer_cpu", &forkattn::encoder_layer_cpu,
        "one BERT encoder layer, eval, no mask, row blocks on revocable threads (CPU, fp32)", py::arg("x"),
        py::arg("qkv_w"), py::arg("qkv_b"), py::arg("attn_out_w"), py::arg("attn_out_b"), py::arg("ln1_w"),
        py::arg("ln1_b"), py::arg("ln1_eps"), py::arg("inter_w"), py::arg("inter_b"), py::arg("out_w"),
        py::arg("out_b"), py::arg("ln2_w"), py::arg("ln2_b"), py::arg("ln2_eps"), py::arg("heads"), py::arg("packed"),
        py::arg("chunks"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  m.def("encoder_layer_varlen_cpu", &forkattn::encoder_layer_varlen_cpu,
        "one BERT encoder layer over packed sequences, eval, row blocks on revocable threads (CPU, fp32)",
        py::arg("x"), py::arg("cu_seqlens"), py::arg("qkv_w"), py::arg("qkv_b"), py::arg("attn_out_w"),
        py::arg("attn_out_b"), py::arg("ln1_w"), py::arg("ln1_b"), py::arg("ln1_eps"), py::arg("inter_w"),
        py::arg("inter_b"), py::arg("out_w"), py::arg("out_b"), py::arg("ln2_w"), py::arg("ln2_b"),
        py::arg("ln2_eps"), py::arg("heads"), py::arg("packed"), py::arg("chunks"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>());
  m.def("encoder_layer_cols_cpu", &forkattn::encoder_layer_cols_cpu,
        "one BERT encoder layer over packed sequences, GEMMs split over output columns (CPU, fp32)", py::arg("x"),
        py::arg("cu_seqlens"), py::arg("qkv_w"), py::arg("qkv_b"), py::arg("attn_out_w"), py::arg("attn_out_b"),
        py::arg("ln1_w"), py::arg("ln1_b"), py::arg("ln1_eps"), py::arg("inter_w"), py::arg("inter_b"),
        py::arg("out_w"), py::arg("out_b"), py::arg("ln2_w"), py::arg("ln2_b"), py::arg("ln2_eps"), py::arg("heads"),
        py::arg("packed"), py::arg("chunks"), py::arg("threads"), py::call_guard<py::gil_scoped_release>());
  // The packed-panel GEMM of the BERT fast path (see csrc/gemm.h).
  m.def("gemm_panel_cols", &forkattn::gemm_panel_cols,
        "output columns per packed panel in the CPU kernel variant in use (48 avx512, 24 avx2 / default)");
  m.def("gemm_pack_cpu", &forkattn::gemm_pack_cpu,
        "nn.Linear weight [N, K] packed into [ceil(N / NR), K, NR] panels, NR = gemm_panel_cols() (CPU, fp32)",
        py::arg("w"));
  m.def("gemm_packed_cpu", &forkattn::gemm_packed_cpu,
        "y[:, n0:n1] = x @ W[n0:n1]^T (+ bias) (+ exact GELU: epilogue 0/1/2) in place, W packed by gemm_pack_cpu "
        "under the same CPU kernel variant, n0 a multiple of its panel width (CPU, fp32)",
        py::arg("x"), py::arg("packed"), py::arg("N"), py::arg("bias"), py::arg("epilogue"), py::arg("y"),
        py::arg("n0"), py::arg("n1"), py::call_guard<py::gil_scoped_release>());
  // MLM masking: writes out_ids and out_labels in place (see csrc/mlm.h).
  m.def("mlm_mask_cpu", &forkattn::mlm_mask_cpu, "MLM 80/10/10 masking (CPU)", py::arg("input_ids"),
        py::arg("out_ids"), py::arg("out_labels"), py::arg("special_tokens_mask"), py::arg("attention_mask"),
        py::arg("labels"), py::arg("word_ids"), py::arg("special_ids"), py::arg("excluded_ids"),
        py::arg("vocab_size"), py::arg("mask_token_id"), py::arg("seed"), py::arg("t_select"), py::arg("t_mask"),
        py::arg("t_random"), py::arg("n_random"), py::arg("exact"), py::arg("min_masked"));
  m.def("kv_append_cpu", &forkattn::kv_append_cpu, "KV-cache append in place (CPU)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"), py::arg("k"), py::arg("v"),
        py::arg("max_seqlen"));
  m.def("decode_attention_cpu", &forkattn::decode_attention_cpu, "decode attention over a KV cache (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"),
        py::arg("o_partial"), py::arg("lse_partial"), py::arg("max_seqlen"), py::arg("num_splits"), py::arg("scale"));
  m.def("disentangled_attention_fwd_cpu", &forkattn::disentangled_attention_fwd_cpu,
        "DeBERTa disentangled attention forward (CPU): (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("pos_key"), py::arg("pos_query"), py::arg("rel_index"), py::arg("key_padding_mask"), py::arg("scale"),
        py::arg("c2p"), py::arg("p2c"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("disentangled_attention_bwd_cpu", &forkattn::disentangled_attention_bwd_cpu,
        "DeBERTa disentangled attention backward (CPU): (dq, dk, dv, dpos_key, dpos_query)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos_key"), py::arg("pos_query"), py::arg("out"),
        py::arg("lse"), py::arg("rel_index"), py::arg("key_padding_mask"), py::arg("scale"), py::arg("c2p"),
        py::arg("p2c"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0, py::arg("want_dpos_key") = true,
        py::arg("want_dpos_query") = true);
#ifdef FORKATTN_WITH_CUDA
  m.def("disentangled_attention_fwd_cuda", &forkattn::disentangled_attention_fwd_cuda,
        "DeBERTa disentangled attention forward (CUDA): (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("pos_key"), py::arg("pos_query"), py::arg("rel_index"), py::arg("key_padding_mask"),
        py::arg("scale"), py::arg("c2p"), py::arg("p2c"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("disentangled_attention_bwd_cuda", &forkattn::disentangled_attention_bwd_cuda,
        "DeBERTa disentangled attention backward (CUDA): (dq, dk, dv, dpos_key, dpos_query)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos_key"), py::arg("pos_query"), py::arg("out"),
        py::arg("lse"), py::arg("rel_index"), py::arg("key_padding_mask"), py::arg("scale"), py::arg("c2p"),
        py::arg("p2c"), py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("mlm_mask_cuda", &forkattn::mlm_mask_cuda, "MLM 80/10/10 masking (CUDA)", py::arg("input_ids"),
        py::arg("out_ids"), py::arg("out_labels"), py::arg("special_tokens_mask"), py::arg("attention_mask"),
        py::arg("labels"), py::arg("word_ids"), py::arg("special_ids"), py::arg("excluded_ids"),
        py::arg("vocab_size"), py::arg("mask_token_id"), py::arg("seed"), py::arg("t_select"), py::arg("t_mask"),
        py::arg("t_random"), py::arg("n_random"), py::arg("exact"), py::arg("min_masked"));
  m.def("kv_append_cuda", &forkattn::kv_append_cuda, "KV-cache append in place (CUDA)", py::arg("k_cache"),
        py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"), py::arg("k"), py::arg("v"),
        py::arg("max_seqlen"));
  m.def("decode_attention_cuda", &forkattn::decode_attention_cuda, "split-KV decode attention (CUDA)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("block_table"),
        py::arg("o_partial"), py::arg("lse_partial"), py::arg("max_seqlen"), py::arg("num_splits"), py::arg("scale"));
  m.def("attention_fwd_cuda", &forkattn::attention_fwd_cuda, "fused attention forward (CUDA): (out, lse)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_bwd_cuda", &forkattn::attention_bwd_cuda, "fused attention backward (CUDA): (dq, dk, dv)",
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_varlen_fwd_cuda", &forkattn::attention_varlen_fwd_cuda,
        "packed varlen attention forward (CUDA): (out, lse [H, total_q])", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
  m.def("attention_varlen_bwd_cuda", &forkattn::attention_varlen_bwd_cuda,
        "packed varlen attention backward (CUDA): (dq, dk, dv)", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("causal"), py::arg("scale"),
        py::arg("dropout_p") = 0.0, py::arg("seed") = 0);
#endif
}
