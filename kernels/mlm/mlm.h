// BERT MLM 80/10/10 masking: the params struct and the per-token logic shared by the CPU kernel
// (csrc/cpu/mlm_cpu.cpp) and the CUDA kernels (kernels/mlm/mlm.cu). Torch-free and CUDA-runtime-free.
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

#include "common/philox.h"

namespace forkattn {
namespace mlm {

constexpr int kMaxSpecial = 64;        // special_token_ids / excluded ids carried by value in the params
constexpr int64_t kIgnoreIndex = -100; // label of unselected tokens

// An optional [B, L] input; ptr == nullptr when absent. bytes = element size (1 for bool/uint8/int8,
// 2 for int16, 4 for int32, 8 for int64); values are read sign-extended.
struct Aux {
  const void* ptr;
  int64_t stride_b, stride_l;  // in elements
  int bytes;
};

struct Params {
  const void* input_ids;  // [B, L] int32 or int64 (id_bytes)
  int64_t in_stride_b, in_stride_l;
  void* out_ids;          // [B, L] like input_ids; may alias input_ids (inplace)
  int64_t out_stride_b, out_stride_l;
  void* out_labels;       // [B, L] like input_ids: the original id where selected, -100 elsewhere
  int64_t lab_stride_b, lab_stride_l;
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

FORKATTN_HD int64_t load_int(const void* base, int bytes, int64_t off) {
  if (bytes == 8) return static_cast<const int64_t*>(base)[off];
  if (bytes == 4) return static_cast<const int32_t*>(base)[off];
  if (bytes == 2) return static_cast<const int16_t*>(base)[off];
  return static_cast<const int8_t*>(base)[off];
}

FORKATTN_HD int64_t load_aux(const Aux& a, int64_t b, int64_t l) {
  return load_int(a.ptr, a.bytes, b * a.stride_b + l * a.stride_l);
}

// r.r[i] for a runtime i, as selects: indexing the array would put it on the GPU stack.
FORKATTN_HD uint32_t lane(const Philox4& r, uint32_t i) {
  const uint32_t lo = (i & 1) ? r.r[1] : r.r[0];
  const uint32_t hi = (i & 1) ? r.r[3] : r.r[2];
  return (i & 2) ? hi : lo;
}

FORKATTN_HD uint32_t select_key(uint64_t seed, int64_t b, int64_t l) {
  const Philox4 r = philox4x32_10(seed, static_cast<uint32_t>(l >> 2), static_cast<uint32_t>(b), 0u, 0u);
  return lane(r, static_cast<uint32_t>(l) & 3u);
}

FORKATTN_HD uint32_t word_key(uint64_t seed, int64_t b, int64_t w) {
  const uint32_t w32 = static_cast<uint32_t>(w);
  const Philox4 r = philox4x32_10(seed, w32 >> 2, static_cast<uint32_t>(b), 2u, 0u);
  return lane(r, w32 & 3u);
}

// Eligible: not padding, not special, labels not -100.
FORKATTN_HD bool eligible(const Params& p, int64_t b, int64_t l, int64_t id) {
  if (p.attention_mask.ptr && load_aux(p.attention_mask, b, l) == 0) return false;
  if (p.special_mask.ptr && load_aux(p.special_mask, b, l) != 0) return false;
  if (p.labels.ptr && load_aux(p.labels, b, l) == kIgnoreIndex) return false;
  for (int i = 0; i < p.n_special; ++i) {
    if (p.special_ids[i] == id) return false;
    if (p.special_ids[i] > id) break;
  }
  return true;
}

FORKATTN_HD int64_t load_id(const Params& p, int64_t b, int64_t l) {
  return load_int(p.input_ids, p.id_bytes, b * p.in_stride_b + l * p.in_stride_l);
}

// What ranking needs to know about token (b, l).
struct TokenInfo {
  bool selectable;  // eligible (and part of a word, with word_ids)
  bool unit;        // the first token of its unit (counted once per unit)
  uint32_t key;     // u_sel, or u_word with word_ids
  uint64_t composite;
};

FORKATTN_HD bool selectable_at(const Params& p, int64_t b, int64_t l, int64_t* wid) {
  const int64_t id = load_id(p, b, l);
  if (!eligible(p, b, l, id)) return false;
  if (p.word_ids.ptr) {
    *wid = load_aux(p.word_ids, b, l);
    return *wid >= 0;
  }
  return true;
}

// with_unit = false skips reading token l - 1 (the final, writing pass must not: with inplace=True a
// neighbour may already have been overwritten); t.unit is then left false.
FORKATTN_HD TokenInfo token_info(const Params& p, int64_t b, int64_t l, bool with_unit) {
  TokenInfo t{false, false, 0u, 0u};
  int64_t wid = 0;
  t.selectable = selectable_at(p, b, l, &wid);
  if (!t.selectable) return t;
  if (p.word_ids.ptr) {
    int64_t prev = -1;
    t.unit = with_unit && (l == 0 || !selectable_at(p, b, l - 1, &prev) || prev != wid);
    t.key = word_key(p.seed, b, wid);
    t.composite = (static_cast<uint64_t>(t.key) << 32) | static_cast<uint32_t>(wid);
  } else {
    t.unit = true;
    t.key = select_key(p.seed, b, l);
    t.composite = (static_cast<uint64_t>(t.key) << 32) | static_cast<uint32_t>(l);
  }
  return t;
}

// Bernoulli rule for an eligible token with word_ids: its word's key decides.
FORKATTN_HD bool bernoulli_word(const Params& p, int64_t b, int64_t l) {
  const int64_t wid = load_aux(p.word_ids, b, l);
  return wid >= 0 && word_key(p.seed, b, wid) < p.t_select;
}

// Units to select in a sequence with n units of which `below` have key < t_select.
FORKATTN_HD int64_t quota(const Params& p, int64_t n, int64_t below) {
  int64_t k = p.exact ? static_cast<int64_t>((static_cast<uint64_t>(n) * p.t_select + (1ull << 31)) >> 32) : below;
  if (k < p.min_masked) k = p.min_masked;
  return k < n ? k : n;
}

// The id that selected token (b, l) with original id `id` is written as (80/10/10 by default).
FORKATTN_HD int64_t replacement(const Params& p, int64_t b, int64_t l, int64_t id) {
  const Philox4 r = philox4x32_10(p.seed, static_cast<uint32_t>(l), static_cast<uint32_t>(b), 1u, 0u);
  const uint64_t fate = r.r[0];
  if (fate < p.t_mask) return p.mask_token_id;
  if (fate >= p.t_random) return id;
  int64_t j = static_cast<int64_t>((static_cast<uint64_t>(r.r[1]) * p.n_random) >> 32);
  for (int i = 0; i < p.n_excluded; ++i) j += (j >= p.excluded_ids[i]) ? 1 : 0;
  return j;
}

FORKATTN_HD void store_int(void* base, int bytes, int64_t off, int64_t v) {
  if (bytes == 8) {
    static_cast<int64_t*>(base)[off] = v;
  } else {
    static_cast<int32_t*>(base)[off] = static_cast<int32_t>(v);
  }
}

// Writes token (b, l)'s output id and label. `id` is its original id.
FORKATTN_HD void write_token(const Params& p, int64_t b, int64_t l, int64_t id, bool selected) {
  const int64_t out = selected ? replacement(p, b, l, id) : id;
  store_int(p.out_ids, p.id_bytes, b * p.out_stride_b + l * p.out_stride_l, out);
  store_int(p.out_labels, p.id_bytes, b * p.lab_stride_b + l * p.lab_stride_l, selected ? id : kIgnoreIndex);
}

}  // namespace mlm
}  // namespace forkattn
