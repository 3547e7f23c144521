// Parameters of BERT MLM 80/10/10 masking, and the rules every backend implements. Torch-free and
// CUDA-runtime-free: read by the CUDA kernels (mask_kernel.cuh) and the CPU kernel
// (csrc/cpu/mlm_cpu.cpp) through the per-token functions in rules.h.
// The Triton kernel (python/forkattn/triton/mlm.py) implements the same rules; all three give
// bit-identical outputs for the same seed.
//
// Random numbers: Philox4x32-10 (common/philox.h) under the call's 64-bit seed. For token (b, l) of a
// [B, L] batch, with counters (c0, c1, c2, c3) of 32 bits each:
//   selection key  u_sel(b, l)  = Philox(l >> 2, b, 0, 0).r[l & 3]
//   fate           u_fate(b, l) = Philox(l,      b, 1, 0).r[0]
//   random id draw u_rand(b, l) = Philox(l,      b, 1, 0).r[1]
//   word key       u_word(b, w) = Philox(w >> 2, b, 2, 0).r[w & 3]   (w = word_ids[b, l] & 0xffffffff)
// Probabilities become 32-bit thresholds T(p) = round(p * 2^32) in [0, 2^32], compared as integers:
//   * a unit (a token, or a word when word_ids is given) has key u = u_sel (or u_word); in "bernoulli"
//     mode it is selected iff u < T(mask_prob);
//   * a selected token becomes mask_token_id iff u_fate < T(mask_replace_prob), a random id iff
//     T(mask_replace_prob) <= u_fate < T(mask_replace_prob + random_replace_prob), and stays otherwise;
//   * the random id is the j-th id, j = (u_rand * n_random) >> 32, of the ascending list of ids in
//     [0, vocab_size) that are not in excluded_ids (the special ids and mask_token_id, by default).
// Units and ranking (mode="exact" and min_masked): a token is selectable iff it is eligible (not
// special, not padding, labels != -100) and, with word_ids, belongs to a word (word_ids >= 0). Without
// word_ids each selectable token is a unit with composite key (u_sel << 32) | l; with word_ids each run
// of consecutive selectable tokens with equal word id is a unit with composite key (u_word << 32) | w
// (a word's pieces are contiguous, as tokenizers' word_ids() give them). Per sequence, with n units of
// which c have u < T(mask_prob):
//   k = mode == exact ? floor((n * T(mask_prob) + 2^31) / 2^32) : c;  k = min(max(k, min_masked), n)
// and the selected units are the k with the smallest composite keys (selected iff key <= the k-th
// smallest composite). When k == c this is exactly the bernoulli rule above, so that case skips ranking.
#pragma once
#include <stdint.h>

namespace forkattn::kernels::mlm {

constexpr int kMaxSpecial = 64;        // special_token_ids / excluded ids carried by value in the params
constexpr int64_t kIgnoreIndex = -100; // label of unselected tokens

// An optional [B, L] input; ptr == nullptr when absent. bytes = element size (1 for bool/uint8/int8,
// 2 for int16, 4 for int32, 8 for int64); values are read sign-extended.
struct Aux {
  const void* ptr;
  int64_t batch_stride, row_stride;  // in elements
  int bytes;
};

struct MlmMaskParams {
  const void* input_ids;  // [B, L] int32 or int64 (id_bytes)
  void* out_ids;          // [B, L] like input_ids; may alias input_ids (inplace)
  void* out_labels;       // [B, L] like input_ids: the original id where selected, -100 elsewhere
  int64_t input_ids_batch_stride, input_ids_row_stride;  // row = token position l
  int64_t out_ids_batch_stride, out_ids_row_stride;
  int64_t out_labels_batch_stride, out_labels_row_stride;
  int id_bytes;           // 4 or 8
  Aux special_mask;       // nonzero = special (never selected)
  Aux attention_mask;     // zero = padding (never selected)
  Aux labels;             // -100 = not eligible
  Aux word_ids;           // >= 0: word index within the sequence; < 0: not part of a word
  int64_t batch, len;
  int64_t mask_token_id;
  uint64_t seed;          // Philox key
  uint64_t t_select;      // T(mask_prob)
  uint64_t t_mask;        // T(mask_replace_prob)
  uint64_t t_random;      // T(mask_replace_prob + random_replace_prob) >= t_mask
  uint64_t n_random;      // vocab_size - n_excluded (>= 1 when t_random > t_mask)
  int64_t min_masked;     // at least min(min_masked, n_units) units per sequence
  int exact;              // 1: k = round(mask_prob * n_units) per sequence
  int n_special;          // special_ids[0, n_special): ascending; tokens with these ids are never selected
  int n_excluded;         // excluded_ids[0, n_excluded): ascending, within [0, vocab); random ids skip them
  int64_t special_ids[kMaxSpecial];
  int64_t excluded_ids[kMaxSpecial];
};

}  // namespace forkattn::kernels::mlm
