// Host entry points of MLM masking (see kernels/mlm/params.h for the exact rules and the Philox layout).
// Python (python/forkattn/mlm.py) validates the user's arguments and turns probabilities into the
// 32-bit thresholds; these functions check tensors again, fill the params and run one kernel.
//
// Arguments of every entry point: writes out_ids and out_labels ([B, L], input_ids' dtype; out_ids may
// be input_ids itself). special_ids / excluded_ids: ascending, at most kernels::mlm::kMaxSpecial each.
// t_*: thresholds in [0, 2^32]. vocab_size: the CPU kernel raises if a non-padding id is outside
// [0, vocab_size).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>
#include "cpu_dispatch.h"

namespace forkattn {
namespace kernels::mlm {
struct MlmMaskParams;  // kernels/mlm/params.h (not included here, so the bindings do not rebuild with it)
}

void mlm_mask_cpu(const at::Tensor& input_ids, const at::Tensor& out_ids, const at::Tensor& out_labels,
                  const std::optional<at::Tensor>& special_tokens_mask, const std::optional<at::Tensor>& attention_mask,
                  const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& word_ids,
                  const std::vector<int64_t>& special_ids, const std::vector<int64_t>& excluded_ids, int64_t vocab_size,
                  int64_t mask_token_id, int64_t seed, int64_t t_select, int64_t t_mask, int64_t t_random,
                  int64_t n_random, bool exact, int64_t min_masked);

#ifdef FORKATTN_WITH_CUDA
// csrc/cuda/mlm_cuda.cpp: same arguments and outputs as mlm_mask_cpu, bit-identical results.
void mlm_mask_cuda(const at::Tensor& input_ids, const at::Tensor& out_ids, const at::Tensor& out_labels,
                   const std::optional<at::Tensor>& special_tokens_mask,
                   const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& labels,
                   const std::optional<at::Tensor>& word_ids, const std::vector<int64_t>& special_ids,
                   const std::vector<int64_t>& excluded_ids, int64_t vocab_size, int64_t mask_token_id, int64_t seed,
                   int64_t t_select, int64_t t_mask, int64_t t_random, int64_t n_random, bool exact,
                   int64_t min_masked);
#endif  // FORKATTN_WITH_CUDA

// Checks every tensor and scalar of an entry point's arguments (except the device) and fills
// *params: shared by the CPU and CUDA entry points.
void fill_mlm_mask_params(kernels::mlm::MlmMaskParams* params, const at::Tensor& input_ids, const at::Tensor& out_ids,
                          const at::Tensor& out_labels, const std::optional<at::Tensor>& special_tokens_mask,
                          const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& labels,
                          const std::optional<at::Tensor>& word_ids, const std::vector<int64_t>& special_ids,
                          const std::vector<int64_t>& excluded_ids, int64_t mask_token_id, int64_t seed,
                          int64_t t_select, int64_t t_mask, int64_t t_random, int64_t n_random, bool exact,
                          int64_t min_masked);

namespace cpu {
// csrc/cpu/mlm_cpu.cpp. Returns true when a non-padding id is outside [0, vocab_size) and stores one
// such id in *bad_id (which one, when several, depends on thread timing). Outputs are written anyway.
bool mlm_mask_kernel(const kernels::mlm::MlmMaskParams& p, int64_t vocab_size, int64_t* bad_id);
}  // namespace cpu

}  // namespace forkattn

// The per-ISA variants of the CPU kernels above (csrc/cpu_dispatch.h).
FORKATTN_CPU_VARIANTS(mlm_mask_kernel)
