// CPU MLM masking: sequences in parallel (at::parallel_for); every rule comes from kernels/mlm/mlm.h,
// shared with the CUDA kernels, so CPU and GPU outputs are bit-identical.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "mlm.h"

namespace forkattn {
namespace cpu {
namespace {

using mlm::Params;

inline bool out_of_vocab(const Params& p, int64_t b, int64_t l, int64_t id, int64_t vocab_size) {
  if (static_cast<uint64_t>(id) < static_cast<uint64_t>(vocab_size)) return false;
  return !(p.attention_mask.ptr && mlm::load_aux(p.attention_mask, b, l) == 0);  // padding may hold anything
}

// Plain bernoulli: one Philox block gives the selection keys of 4 consecutive tokens.
template <typename id_t>
void row_bernoulli(const Params& p, int64_t b, int64_t vocab_size, bool* bad, int64_t* bad_id) {
  const id_t* in = static_cast<const id_t*>(p.input_ids) + b * p.in_stride_b;
  for (int64_t l0 = 0; l0 < p.len; l0 += 4) {
    const Philox4 keys = philox4x32_10(p.seed, static_cast<uint32_t>(l0 >> 2), static_cast<uint32_t>(b), 0u, 0u);
    const int64_t n = std::min<int64_t>(4, p.len - l0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t l = l0 + i;
      const int64_t id = in[l * p.in_stride_l];
      if (out_of_vocab(p, b, l, id, vocab_size)) {
        *bad = true;
        *bad_id = id;
      }
      bool sel = mlm::eligible(p, b, l, id);
      if (sel) sel = p.word_ids.ptr ? mlm::bernoulli_word(p, b, l) : keys.r[i] < p.t_select;
      mlm::write_token(p, b, l, id, sel);
    }
  }
}

// Ranked (mode="exact" or min_masked): k-th smallest composite key of the row's units by nth_element.
void row_ranked(const Params& p, int64_t b, int64_t vocab_size, std::vector<uint64_t>& units, bool* bad,
                int64_t* bad_id) {
  units.clear();
  int64_t below = 0;
  for (int64_t l = 0; l < p.len; ++l) {
    const mlm::TokenInfo t = mlm::token_info(p, b, l, true);
    if (t.unit) {
      units.push_back(t.composite);
      below += t.key < p.t_select;
    }
  }
  const int64_t n = static_cast<int64_t>(units.size());
  const int64_t k = mlm::quota(p, n, below);
  const bool by_rank = k != below;
  uint64_t kth = 0;
  if (by_rank && k > 0) {
    std::nth_element(units.begin(), units.begin() + (k - 1), units.end());
    kth = units[k - 1];
  }
  for (int64_t l = 0; l < p.len; ++l) {
    const int64_t id = mlm::load_id(p, b, l);
    if (out_of_vocab(p, b, l, id, vocab_size)) {
      *bad = true;
      *bad_id = id;
    }
    const mlm::TokenInfo t = mlm::token_info(p, b, l, false);
    const bool sel = t.selectable && (by_rank ? (k > 0 && t.composite <= kth) : t.key < p.t_select);
    mlm::write_token(p, b, l, id, sel);
  }
}

}  // namespace

bool mlm_mask_kernel(const Params& p, int64_t vocab_size, int64_t* bad_id) {
  const bool ranked = p.exact || p.min_masked > 0;
  std::atomic<bool> any_bad{false};
  std::atomic<int64_t> some_bad{0};
  // ~4 rows of 512 per task: small batches of long rows still spread over the threads.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(p.len, 1));
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    int64_t bid = 0;
    std::vector<uint64_t> units;
    for (int64_t b = begin; b < end; ++b) {
      if (ranked) {
        row_ranked(p, b, vocab_size, units, &bad, &bid);
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
