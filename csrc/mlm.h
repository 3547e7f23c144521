// Host entry points of MLM masking (see kernels/mlm/mlm.h for the exact rules and the Philox layout).
// Python (python/forkattn/mlm.py) validates the user's arguments and turns probabilities into the
// 32-bit thresholds; these functions check tensors again, fill mlm::Params and run one kernel.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "mlm/mlm.h"

namespace forkattn {

// Writes out_ids and out_labels ([B, L], input_ids' dtype; out_ids may be input_ids itself).
// special_ids / excluded_ids: ascending, at most mlm::kMaxSpecial each. t_*: thresholds in [0, 2^32].
// vocab_size: the CPU kernel raises if a non-padding id is outside [0, vocab_size).
#define FORKATTN_MLM_ARGS                                                                                \
  const at::Tensor &input_ids, const at::Tensor &out_ids, const at::Tensor &out_labels,                  \
      const std::optional<at::Tensor>&special_tokens_mask, const std::optional<at::Tensor>&attention_mask, \
      const std::optional<at::Tensor>&labels, const std::optional<at::Tensor>&word_ids,                  \
      const std::vector<int64_t>&special_ids, const std::vector<int64_t>&excluded_ids, int64_t vocab_size, \
      int64_t mask_token_id, int64_t seed, int64_t t_select, int64_t t_mask, int64_t t_random,          \
      int64_t n_random, bool exact, int64_t min_masked

void mlm_mask_cpu(FORKATTN_MLM_ARGS);
#ifdef FORKATTN_WITH_CUDA
void mlm_mask_cuda(FORKATTN_MLM_ARGS);
#endif

// Checks every tensor and fills the params (shared by the CPU and CUDA entry points).
mlm::Params make_mlm_params(FORKATTN_MLM_ARGS);

namespace cpu {
// csrc/cpu/mlm_cpu.cpp. Returns true when a non-padding id is outside [0, vocab_size) and stores one
// such id in *bad_id (which one, when several, depends on thread timing). Outputs are written anyway.
bool mlm_mask_kernel(const mlm::Params& p, int64_t vocab_size, int64_t* bad_id);
}  // namespace cpu

}  // namespace forkattn
