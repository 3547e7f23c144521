// The per-token rules of MLM masking (documented in params.h), shared by the CPU kernel
// (csrc/cpu/mlm_cpu.cpp) and the CUDA kernels (mask_kernel.cuh) so the two agree bit for bit.
#pragma once
#include <stdint.h>

#include "common/philox.h"
#include "mlm/params.h"

namespace forkattn::kernels::mlm {

FORKATTN_HD int64_t load_int(const void* base, int bytes, int64_t off) {
  if (bytes == 8) return static_cast<const int64_t*>(base)[off];
  if (bytes == 4) return static_cast<const int32_t*>(base)[off];
  if (bytes == 2) return static_cast<const int16_t*>(base)[off];
  return static_cast<const int8_t*>(base)[off];
}

FORKATTN_HD int64_t load_aux(const Aux& a, int64_t b, int64_t l) {
  return load_int(a.ptr, a.bytes, b * a.batch_stride + l * a.row_stride);
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
FORKATTN_HD bool eligible(const MlmMaskParams& p, int64_t b, int64_t l, int64_t id) {
  if (p.attention_mask.ptr && load_aux(p.attention_mask, b, l) == 0) return false;
  if (p.special_mask.ptr && load_aux(p.special_mask, b, l) != 0) return false;
  if (p.labels.ptr && load_aux(p.labels, b, l) == kIgnoreIndex) return false;
  if (p.n_special == 0 || id > p.special_ids[p.n_special - 1]) return true;  // the common case: a word id
  for (int i = 0; i < p.n_special; ++i) {
    if (p.special_ids[i] == id) return false;
    if (p.special_ids[i] > id) break;
  }
  return true;
}

FORKATTN_HD int64_t load_id(const MlmMaskParams& p, int64_t b, int64_t l) {
  return load_int(p.input_ids, p.id_bytes, b * p.input_ids_batch_stride + l * p.input_ids_row_stride);
}

// What ranking needs to know about token (b, l).
struct TokenInfo {
  bool selectable;  // eligible (and part of a word, with word_ids)
  bool unit;        // the first token of its unit (counted once per unit)
  uint32_t key;     // u_sel, or u_word with word_ids
  uint64_t composite;
};

FORKATTN_HD bool selectable_at(const MlmMaskParams& p, int64_t b, int64_t l, int64_t* wid) {
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
FORKATTN_HD TokenInfo token_info(const MlmMaskParams& p, int64_t b, int64_t l, bool with_unit) {
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
FORKATTN_HD bool bernoulli_word(const MlmMaskParams& p, int64_t b, int64_t l) {
  const int64_t wid = load_aux(p.word_ids, b, l);
  return wid >= 0 && word_key(p.seed, b, wid) < p.t_select;
}

// Units to select in a sequence with n units of which `below` have key < t_select.
FORKATTN_HD int64_t quota(const MlmMaskParams& p, int64_t n, int64_t below) {
  int64_t k = p.exact ? static_cast<int64_t>((static_cast<uint64_t>(n) * p.t_select + (1ull << 31)) >> 32) : below;
  if (k < p.min_masked) k = p.min_masked;
  return k < n ? k : n;
}

// The id a selected token with original id `id` becomes, given its fate and random draws
// (80/10/10 by default).
FORKATTN_HD int64_t replacement_from(const MlmMaskParams& p, uint32_t fate, uint32_t rnd, int64_t id) {
  if (fate < p.t_mask) return p.mask_token_id;
  if (fate >= p.t_random) return id;
  int64_t j = static_cast<int64_t>((static_cast<uint64_t>(rnd) * p.n_random) >> 32);
  for (int i = 0; i < p.n_excluded; ++i) j += (j >= p.excluded_ids[i]) ? 1 : 0;
  return j;
}

// Token (b, l)'s fate and random draws: Philox(l, b, 1, 0).r[0], .r[1].
FORKATTN_HD int64_t replacement(const MlmMaskParams& p, int64_t b, int64_t l, int64_t id) {
  const Philox4 r = philox4x32_10(p.seed, static_cast<uint32_t>(l), static_cast<uint32_t>(b), 1u, 0u);
  return replacement_from(p, r.r[0], r.r[1], id);
}

FORKATTN_HD void store_int(void* base, int bytes, int64_t off, int64_t v) {
  if (bytes == 8) {
    static_cast<int64_t*>(base)[off] = v;
  } else {
    static_cast<int32_t*>(base)[off] = static_cast<int32_t>(v);
  }
}

// Stores token (b, l)'s output id and label.
FORKATTN_HD void store_token(const MlmMaskParams& p, int64_t b, int64_t l, int64_t out_id, int64_t label) {
  store_int(p.out_ids, p.id_bytes, b * p.out_ids_batch_stride + l * p.out_ids_row_stride, out_id);
  store_int(p.out_labels, p.id_bytes, b * p.out_labels_batch_stride + l * p.out_labels_row_stride, label);
}

// Writes token (b, l)'s output id and label. `id` is its original id.
FORKATTN_HD void write_token(const MlmMaskParams& p, int64_t b, int64_t l, int64_t id, bool selected) {
  store_token(p, b, l, selected ? replacement(p, b, l, id) : id, selected ? id : kIgnoreIndex);
}

}  // namespace forkattn::kernels::mlm
