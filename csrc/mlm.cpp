// Host side of MLM masking: tensor checks, params filling, the CPU entry point.
#include "mlm.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"
#include "mlm/params.h"

namespace forkattn {

using kernels::mlm::Aux;
using kernels::mlm::MlmMaskParams;

namespace {

void check_ids_like(const at::Tensor& t, const char* name, const at::Tensor& input_ids) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == input_ids.sizes(), name, " must have input_ids' shape ",
                    input_ids.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == input_ids.device(), name, " must be on input_ids' device ", input_ids.device(),
                    ", got ", t.device());
}

Aux aux(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& input_ids, bool signed_int) {
  if (!t.has_value()) return Aux{nullptr, 0, 0, 0};
  check_ids_like(*t, name, input_ids);
  const at::ScalarType st = t->scalar_type();
  const bool ok = signed_int ? (st == at::kInt || st == at::kLong)
                             : (st == at::kBool || st == at::kByte || st == at::kChar || st == at::kShort ||
                                st == at::kInt || st == at::kLong);
  TORCH_CHECK_TYPE(ok, name, signed_int ? " must be int32 or int64" : " must be bool or an integer dtype", ", got ", st);
  return Aux{t->data_ptr(), t->stride(0), t->stride(1), static_cast<int>(t->element_size())};
}

void fill_ids(const std::vector<int64_t>& ids, const char* name, int64_t* dst, int* n) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(ids.size()) <= kernels::mlm::kMaxSpecial, name, " may hold at most ",
                    kernels::mlm::kMaxSpecial, " ids, got ", ids.size());
  TORCH_CHECK_VALUE(std::is_sorted(ids.begin(), ids.end()), name, " must be sorted ascending");
  std::copy(ids.begin(), ids.end(), dst);
  *n = static_cast<int>(ids.size());
}

}  // namespace

void fill_mlm_mask_params(MlmMaskParams* params, const at::Tensor& input_ids, const at::Tensor& out_ids,
                          const at::Tensor& out_labels, const std::optional<at::Tensor>& special_tokens_mask,
                          const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& labels,
                          const std::optional<at::Tensor>& word_ids, const std::vector<int64_t>& special_ids,
                          const std::vector<int64_t>& excluded_ids, int64_t mask_token_id, int64_t seed,
                          int64_t t_select, int64_t t_mask, int64_t t_random, int64_t n_random, bool exact,
                          int64_t min_masked) {
  FA_CHECK_DIM(input_ids, 2);
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kInt || input_ids.scalar_type() == at::kLong,
                   "input_ids must be int32 or int64, got ", input_ids.scalar_type());
  for (const at::Tensor* t : {&out_ids, &out_labels}) {
    const char* name = t == &out_ids ? "out_ids" : "out_labels";
    check_ids_like(*t, name, input_ids);
    TORCH_CHECK_TYPE(t->scalar_type() == input_ids.scalar_type(), name, " must have input_ids' dtype ",
                     input_ids.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(input_ids.size(0) < (int64_t(1) << 32) && input_ids.size(1) < (int64_t(1) << 32),
                    "input_ids must have fewer than 2^32 rows and columns (32-bit Philox counters), got ",
                    input_ids.sizes());
  for (int64_t t : {t_select, t_mask, t_random}) {
    TORCH_CHECK_VALUE(t >= 0 && t <= (int64_t(1) << 32), "thresholds must be in [0, 2^32], got ", t);
  }
  TORCH_CHECK_VALUE(t_mask <= t_random, "t_mask must not exceed t_random");
  TORCH_CHECK_VALUE(n_random >= 1 || t_random == t_mask, "n_random must be >= 1 when random replacement is possible");
  TORCH_CHECK_VALUE(n_random < (int64_t(1) << 32), "at most 2^32 - 1 ids can be drawn, got ", n_random);
  TORCH_CHECK_VALUE(min_masked >= 0, "min_masked must be >= 0, got ", min_masked);
  MlmMaskParams p{};
  p.input_ids = input_ids.data_ptr();
  p.out_ids = out_ids.data_ptr();
  p.out_labels = out_labels.data_ptr();
  p.input_ids_batch_stride = input_ids.stride(0), p.input_ids_row_stride = input_ids.stride(1);
  p.out_ids_batch_stride = out_ids.stride(0), p.out_ids_row_stride = out_ids.stride(1);
  p.out_labels_batch_stride = out_labels.stride(0), p.out_labels_row_stride = out_labels.stride(1);
  p.id_bytes = static_cast<int>(input_ids.element_size());
  p.special_mask = aux(special_tokens_mask, "special_tokens_mask", input_ids, false);
  p.attention_mask = aux(attention_mask, "attention_mask", input_ids, false);
  p.labels = aux(labels, "labels", input_ids, true);
  p.word_ids = aux(word_ids, "word_ids", input_ids, true);
  p.batch = input_ids.size(0);
  p.len = input_ids.size(1);
  p.mask_token_id = mask_token_id;
  p.seed = static_cast<uint64_t>(seed);
  p.t_select = static_cast<uint64_t>(t_select);
  p.t_mask = static_cast<uint64_t>(t_mask);
  p.t_random = static_cast<uint64_t>(t_random);
  p.n_random = static_cast<uint64_t>(n_random);
  p.min_masked = min_masked;
  p.exact = exact ? 1 : 0;
  fill_ids(special_ids, "special_ids", p.special_ids, &p.n_special);
  fill_ids(excluded_ids, "excluded_ids", p.excluded_ids, &p.n_excluded);
  *params = p;
}

void mlm_mask_cpu(const at::Tensor& input_ids, const at::Tensor& out_ids, const at::Tensor& out_labels,
                  const std::optional<at::Tensor>& special_tokens_mask, const std::optional<at::Tensor>& attention_mask,
                  const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& word_ids,
                  const std::vector<int64_t>& special_ids, const std::vector<int64_t>& excluded_ids, int64_t vocab_size,
                  int64_t mask_token_id, int64_t seed, int64_t t_select, int64_t t_mask, int64_t t_random,
                  int64_t n_random, bool exact, int64_t min_masked) {
  MlmMaskParams p;
  fill_mlm_mask_params(&p, input_ids, out_ids, out_labels, special_tokens_mask, attention_mask, labels, word_ids,
                       special_ids, excluded_ids, mask_token_id, seed, t_select, t_mask, t_random, n_random, exact,
                       min_masked);
  TORCH_CHECK_VALUE(input_ids.device().is_cpu(), "input_ids must be a CPU tensor for the cpu backend, got ",
                    input_ids.device());
  if (input_ids.numel() == 0) return;
  int64_t bad = 0;
  const bool found_bad = FORKATTN_CPU_DISPATCH(mlm_mask_kernel)(p, vocab_size, &bad);
  TORCH_CHECK_VALUE(!found_bad, "input_ids holds id ", bad, " at a non-padding position, outside [0, vocab_size=",
                    vocab_size, ")");
}

}  // namespace forkattn
