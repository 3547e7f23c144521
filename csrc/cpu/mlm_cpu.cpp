// CPU MLM masking: sequences in parallel (at::parallel_for); every rule comes from kernels/mlm/rules.h,
// shared with the CUDA kernels, so CPU and GPU outputs are bit-identical.
#include "cpu/isa.h"  // first: this file is compiled once per ISA variant

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "mlm.h"
#include "mlm/rules.h"

namespace forkattn {
namespace cpu::CPU_CAPABILITY {  // one copy per ISA variant: cpu/isa.h
namespace {

namespace mlm = kernels::mlm;
using mlm::MlmMaskParams;
using kernels::philox4x32_10_x8;

inline bool out_of_vocab(const MlmMaskParams& p, int64_t b, int64_t l, int64_t id, int64_t vocab_size) {
  if (static_cast<uint64_t>(id) < static_cast<uint64_t>(vocab_size)) return false;
  return !(p.attention_mask.ptr && mlm::load_aux(p.attention_mask, b, l) == 0);  // padding may hold anything
}

// Plain bernoulli, 32 tokens at a time: 8 Philox blocks give their selection keys (u_sel(b, l) is block
// l >> 2, lane l & 3), then the fate blocks of the selected ones are computed 8 at a time.
template <typename id_t>
void row_bernoulli(const MlmMaskParams& p, int64_t b, int64_t vocab_size, bool* bad, int64_t* bad_id) {
  constexpr int kChunk = 32;
  const id_t* in = static_cast<const id_t*>(p.input_ids) + b * p.input_ids_batch_stride;
  uint32_t c0[8], cb[8], keys[4][8], fates[4][8];
  int64_t sel_l[kChunk + 8], sel_id[kChunk + 8];
  for (int j = 0; j < 8; ++j) cb[j] = static_cast<uint32_t>(b);
  for (int64_t l0 = 0; l0 < p.len; l0 += kChunk) {
    for (int j = 0; j < 8; ++j) c0[j] = static_cast<uint32_t>((l0 >> 2) + j);
    philox4x32_10_x8(p.seed, c0, cb, 0u, 0u, keys);
    const int64_t n = std::min<int64_t>(kChunk, p.len - l0);
    int n_sel = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = l0 + i;
      const int64_t id = in[l * p.input_ids_row_stride];
      if (out_of_vocab(p, b, l, id, vocab_size)) {
        *bad = true;
        *bad_id = id;
      }
      bool sel = mlm::eligible(p, b, l, id);
      if (sel) sel = p.word_ids.ptr ? mlm::bernoulli_word(p, b, l) : keys[i & 3][i >> 2] < p.t_select;
      if (sel) {
        sel_l[n_sel] = l;
        sel_id[n_sel++] = id;
      } else {
        mlm::store_token(p, b, l, id, mlm::kIgnoreIndex);
      }
    }
    for (int s0 = 0; s0 < n_sel; s0 += 8) {
      for (int j = 0; j < 8; ++j) c0[j] = static_cast<uint32_t>(sel_l[std::min(s0 + j, n_sel - 1)]);
      philox4x32_10_x8(p.seed, c0, cb, 1u, 0u, fates);  // Philox(l, b, 1, 0)
      for (int j = 0; j < 8 && s0 + j < n_sel; ++j) {
        const int64_t id = sel_id[s0 + j];
        mlm::store_token(p, b, sel_l[s0 + j], mlm::replacement_from(p, fates[0][j], fates[1][j], id), id);
      }
    }
  }
}

// Ranked (mode="exact" or min_masked): k-th smallest composite key of the row's units by nth_element.
// Pass 1 caches each token's selectability and composite key (token_info, shared with the GPU), so
// the writing pass recomputes nothing; fates are drawn 8 Philox blocks at a time.
struct RowScratch {
  std::vector<uint64_t> units, comp;
  std::vector<uint8_t> selectable;
};

void row_ranked(const MlmMaskParams& p, int64_t b, int64_t vocab_size, RowScratch& s, bool* bad, int64_t* bad_id) {
  s.units.clear();
  s.comp.resize(p.len);
  s.selectable.resize(p.len);
  int64_t below = 0;
  for (int64_t l = 0; l < p.len; ++l) {
    const mlm::TokenInfo t = mlm::token_info(p, b, l, true);
    s.selectable[l] = t.selectable;
    s.comp[l] = t.composite;
    if (t.unit) {
      s.units.push_back(t.composite);
      below += t.key < p.t_select;
    }
  }
  const int64_t n = static_cast<int64_t>(s.units.size());
  const int64_t k = mlm::quota(p, n, below);
  const bool by_rank = k != below;
  uint64_t kth = 0;
  if (by_rank && k > 0) {
    std::nth_element(s.units.begin(), s.units.begin() + (k - 1), s.units.end());
    kth = s.units[k - 1];
  }
  uint32_t c0[8], cb[8], fates[4][8];
  int64_t sel_l[8], sel_id[8];
  int n_sel = 0;
  for (int j = 0; j < 8; ++j) cb[j] = static_cast<uint32_t>(b);
  auto flush = [&]() {
    for (int j = 0; j < 8; ++j) c0[j] = static_cast<uint32_t>(sel_l[std::min(j, n_sel - 1)]);
    philox4x32_10_x8(p.seed, c0, cb, 1u, 0u, fates);  // Philox(l, b, 1, 0)
    for (int j = 0; j < n_sel; ++j) {
      mlm::store_token(p, b, sel_l[j], mlm::replacement_from(p, fates[0][j], fates[1][j], sel_id[j]), sel_id[j]);
    }
    n_sel = 0;
  };
  for (int64_t l = 0; l < p.len; ++l) {
    const int64_t id = mlm::load_id(p, b, l);
    if (out_of_vocab(p, b, l, id, vocab_size)) {
      *bad = true;
      *bad_id = id;
    }
    // by_rank: the k smallest composites; else the bernoulli rule key < t_select (key = composite >> 32)
    const bool sel = s.selectable[l] && (by_rank ? (k > 0 && s.comp[l] <= kth) : (s.comp[l] >> 32) < p.t_select);
    if (sel) {
      sel_l[n_sel] = l;
      sel_id[n_sel++] = id;
      if (n_sel == 8) flush();
    } else {
      mlm::store_token(p, b, l, id, mlm::kIgnoreIndex);
    }
  }
  if (n_sel > 0) flush();
}

}  // namespace

bool mlm_mask_kernel(const MlmMaskParams& p, int64_t vocab_size, int64_t* bad_id) {
  const bool ranked = p.exact || p.min_masked > 0;
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> some_bad{0};
  // ~4 rows of 512 per task: small batches of long rows still spread over the threads.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(p.len, 1));
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    int64_t bid = 0;
    RowScratch scratch;
    for (int64_t b = begin; b < end; ++b) {
      if (ranked) {
        row_ranked(p, b, vocab_size, scratch, &bad, &bid);
      } else if (p.id_bytes == 8) {
        row_bernoulli<int64_t>(p, b, vocab_size, &bad, &bid);
      } else {
        row_bernoulli<int32_t>(p, b, vocab_size, &bad, &bid);
      }
    }
    if (bad) {
      some_bad.store(bid);
      any_bad.store(true);
    }
  });
  *bad_id = some_bad.load();
  return any_bad.load();
}

}  // namespace cpu
}  // namespace forkattn
