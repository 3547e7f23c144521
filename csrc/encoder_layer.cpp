// One native call per BERT encoder layer on the CPU inference fast path (issue #18, batch 1):
// encoder_layer_cpu in csrc/encoder.h. Two things make it faster than the per-op path at small sizes:
//
// - No Python or dispatcher hop between the layer's ops (about ten per layer on the op path).
// - A thread pool that never waits for a thread that has not started. torch's OpenMP regions end
//   in a barrier: on a loaded 2-core machine every region of a batch-1 forward (five per layer)
//   waits for a partner thread the scheduler has not run yet, which measured 4-5x the one-thread
//   time. Here the layer's rows are cut into chunks that the calling thread and helper threads
//   take one at a time from a shared counter; a helper that has not started by the time the caller
//   runs out of chunks is revoked instead of waited for (ONNX Runtime's thread pool does the same).
//   Every chunk runs torch's ops single-threaded (OpenMP's thread count is 1 on these threads while
//   they work), so no OpenMP region opens inside.
//
// Per layer, two rounds of chunks: (A) the QKV GEMM over row blocks; (B) per block of query rows,
// attention against all keys of their sequence, then the output projection + bias + residual +
// LayerNorm, the FFN GEMM, its bias + GELU pass and the second bias + residual + LayerNorm, all of
// which are row-local. The rows are those of one or more equal-length sequences ([B, L, H],
// encoder_layer_cpu) or of packed sequences of any lengths ([T, H] + cu_seqlens,
// encoder_layer_varlen_cpu: a padded batch's real tokens); a row block may span sequences.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "attention.h"
#include "checks.h"
#include "encoder.h"
#include "gemm.h"

namespace forkattn {

namespace {

// One parallel round: chunks [0, n) handed out by `next`; the first exception is kept.
struct Round {
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;
  bool inference_mode = false;
  std::atomic<int64_t> next{0};
  std::mutex err_mutex;
  std::exception_ptr err;

  // Takes chunks until none is left; torch's ops inside run on this thread alone.
  void work() {
    c10::InferenceMode inference(inference_mode);
    c10::AutoGradMode no_grad(false);
#ifdef _OPENMP
    // Each shared library has its own copy of ATen's per-thread lazy init (an inline function with a
    // thread_local flag), which sets OpenMP's count to torch's on a thread's first parallel op: run
    // this extension's and libtorch's (inside at::get_num_threads) first, or they would undo the 1.
    at::internal::lazy_init_num_threads();
    (void)at::get_num_threads();
    const int before = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      try {
        (*fn)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mutex);
        if (!err) err = std::current_exception();
        next.store(n);
      }
    }
#ifdef _OPENMP
    omp_set_num_threads(before);
#endif
  }
};

// A helper thread: idle, queued (a round posted, not yet picked up: revocable) or running. The
// caller never sleeps waiting for a helper: it spins, then yields, until the helper leaves the
// round, because on a loaded machine a sleeping caller waits a scheduler turn to run again after
// the helper wakes it (2 rounds per layer, each a possible scheduler wait).
class Helper {
 public:
  Helper() : thread_([this] { loop(); }) {}
  ~Helper() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void post(Round* r) {
    {
      std::lock_guard<std::mutex> lock(m_);
      round_.store(r, std::memory_order_release);
      state_.store(kQueued);
    }
    cv_.notify_all();
  }
  std::thread::native_handle_type handle() { return thread_.native_handle(); }
#ifdef __linux__
  // Whether this helper's thread belongs to this process: a forked child inherits the pool's
  // objects but not their threads, and their handles name threads of the parent.
  bool ours() const { return pid_ == getpid(); }
#endif
  // Revoke the round if the helper has not picked it up, else wait until it has left it.
  void finish() {
    int expected = kQueued;
    if (state_.compare_exchange_strong(expected, kIdle)) return;
    for (int spin = 0; state_.load(std::memory_order_acquire) != kIdle; ++spin) {
      if (spin > 2000) std::this_thread::yield();
    }
  }

 private:
  enum State { kIdle, kQueued, kRunning };
  void loop() {
    for (;;) {
      // Poll for up to 200 us before sleeping: the column-split layer (layer_cols) posts 7 short rounds
      // per layer back to back, and this helper finishes its part of a round some tens of us before
      // the caller posts the next one. Sleeping then costs a futex wake-up per round (and in a VM the
      // idle vCPU's own wake-up; not timed alone): with a 20 us poll a MiniLM B1 forward took 14.8 ms
      // median, with 200 us 9.0 ms (docs/CPU_INFERENCE.md); 1000 us bought nothing more.
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
      while (state_.load(std::memory_order_acquire) != kQueued && std::chrono::steady_clock::now() < until) {
      }
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return stop_ || state_.load() == kQueued; });
        if (stop_) return;
      }
      int expected = kQueued;
      if (!state_.compare_exchange_strong(expected, kRunning)) continue;  // revoked meanwhile
      Round* r = round_.load(std::memory_order_acquire);
      r->work();
      state_.store(kIdle, std::memory_order_release);
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<int> state_{kIdle};
  std::atomic<Round*> round_{nullptr};
  bool stop_ = false;
#ifdef __linux__
  const pid_t pid_ = getpid();
#endif
  std::thread thread_;  // last: starts after the fields above exist
};

// Keeps the helpers off the CPU the calling thread runs on (Linux; FORKATTN_CPU_HELPER_AFFINITY=0
// turns it off). A helper sleeping between rounds is woken by the caller, and the kernel's wake-up
// placement often puts it on the waker's CPU, where it shares that core with the caller until the
// load balancer moves one of them, while the other core idles. Measured on the 2-core VM (MiniLM B1
// L128 at 2 threads, 40 forwards per process, docs/CPU_INFERENCE.md): caller and helper waited
// 85-170 ms in the run queue per process and the median forward took 8.9-13.5 ms; with the two on
// different CPUs, 0.1-22 ms and 8.4-9.0 ms. So each helper's affinity is the caller's own CPU set
// minus the CPU the caller is on: the user's taskset / cgroup choice stays in force, and on a larger
// machine the helpers still float over the other CPUs. Re-applied only when the caller's CPU or CPU
// set changes (one sched_getcpu and one sched_getaffinity per round otherwise). Called with the pool
// locked.
void keep_off_caller_cpu(std::vector<std::unique_ptr<Helper>>& helpers) {
#ifdef __linux__
  static const bool enabled = [] {
    const char* v = std::getenv("FORKATTN_CPU_HELPER_AFFINITY");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  static int last_cpu = -1;
  static size_t last_helpers = 0;
  static cpu_set_t last_set;
  if (!enabled) return;
  const int cpu = sched_getcpu();
  cpu_set_t set;
  CPU_ZERO(&set);
  if (cpu < 0 || cpu >= CPU_SETSIZE || pthread_getaffinity_np(pthread_self(), sizeof(set), &set) != 0) return;
  if (cpu == last_cpu && helpers.size() == last_helpers && CPU_EQUAL(&set, &last_set)) return;
  last_cpu = cpu;
  last_helpers = helpers.size();
  last_set = set;
  if (!CPU_ISSET(cpu, &set) || CPU_COUNT(&set) < 2) return;  // nowhere else to go: leave them as they are
  CPU_CLR(cpu, &set);
  for (auto& h : helpers) {
    if (h->ours()) pthread_setaffinity_np(h->handle(), sizeof(set), &set);  // best effort
  }
#else
  (void)helpers;
#endif
}

// fn(i) for i in [0, n) on the calling thread and up to `threads - 1` helpers (created on first use,
// kept for the process). One caller at a time: concurrent callers serialise on the pool.
void run_chunks(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  static std::mutex pool_mutex;
  // never destroyed: idle helpers wait on their condition variable until the process exits
  static auto& helpers = *new std::vector<std::unique_ptr<Helper>>();
  Round round;
  round.n = n;
  round.fn = &fn;
  round.inference_mode = c10::InferenceMode::is_enabled();
  const int64_t want = std::min<int64_t>(threads - 1, n - 1);
  if (want <= 0) {
    round.work();
  } else {
    std::lock_guard<std::mutex> lock(pool_mutex);
    while (static_cast<int64_t>(helpers.size()) < want) helpers.push_back(std::make_unique<Helper>());
    keep_off_caller_cpu(helpers);
    for (int64_t h = 0; h < want; ++h) helpers[h]->post(&round);
    round.work();
    for (int64_t h = 0; h < want; ++h) helpers[h]->finish();
  }
  if (round.err) std::rethrow_exception(round.err);
}

// x @ w^T (+ bias) (+ exact GELU): oneDNN's packed linear when `packed` and w is a oneDNN tensor
// (so a caller may leave single weights plain, for at::linear: MKL's sgemm), else at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool packed,
                  bool gelu) {
  if (!packed || !w.is_mkldnn()) {
    at::Tensor y = at::linear(x, w, bias);
    return gelu ? at::gelu(y) : y;
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, bias ? c10::IValue(*bias) : c10::IValue(), std::string(gelu ? "gelu" : "none"),
                                 c10::List<std::optional<at::Scalar>>(),
                                 gelu ? c10::IValue(std::string("none")) : c10::IValue(std::string(""))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A weight packed into panels by gemm_pack_cpu (csrc/gemm.h) is 3-D [panels, K, NR]; plain and
// oneDNN weights are 2-D.
bool is_panel(const at::Tensor& w) { return w.dim() == 3; }

// Columns [n0, n1) of x @ W^T (+ bias) (+ exact GELU when `gelu`) into y (rows of a buffer with unit
// column stride, indexed by W's columns: a column slice of the layer's buffer) with the packed-panel
// GEMM, the bias and GELU in its store. n0 on a panel border.
void panel_gemm(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool gelu,
                const at::Tensor& y, int64_t n0, int64_t n1) {
  const int ep = static_cast<int>(!bias ? GemmEpilogue::kNone : gelu ? GemmEpilogue::kBiasGelu : GemmEpilogue::kBias);
  FORKATTN_CPU_DISPATCH(gemm_kernel)(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1), w.data_ptr<float>(), n0,
                                     n1, bias ? bias->data_ptr<float>() : nullptr, ep, y.data_ptr<float>(),
                                     y.stride(0));
}

// x @ W^T (+ bias) (+ exact GELU when `gelu`: then bias is required) as a new [rows, N]: the
// packed-panel GEMM for a panel weight, else `linear` and, with gelu, the bias + GELU pass
// (oneDNN's erf-GELU post-op measured 0.7-1.4 ms slower per call at BERT's FFN shapes, docs).
at::Tensor gemm_new(const at::Tensor& x, const at::Tensor& w, int64_t N, const std::optional<at::Tensor>& bias,
                    bool gelu, bool packed) {
  if (is_panel(w)) {
    at::Tensor y = at::empty({x.size(0), N}, x.options());
    panel_gemm(x, w, bias, gelu, y, 0, N);
    return y;
  }
  at::Tensor y = linear(x, w, gelu ? std::nullopt : bias, packed, false);
  if (gelu) bias_gelu_cpu(y, *bias);
  return y;
}

void check_weight(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  FA_CHECK_DTYPE_NAMED(t, name, at::kFloat);
}

// Attention of query rows [r0, r1) of qkv [T, 3H] (row-major [T, 3, heads, D]): each part of a
// sequence s (rows [seq[s], seq[s + 1])) against that sequence's keys and values, into y [r1 - r0,
// heads, D] (rows r0.. of the layer's attention output; any contiguous [n, heads, D] view).
void attend_rows(const at::Tensor& qkv, const std::vector<int64_t>& seq, int64_t r0, int64_t r1, int64_t heads,
                 const at::Tensor& y) {
  const int64_t T = qkv.size(0), D = qkv.size(1) / 3 / heads;
  const at::Tensor q4 = qkv.view({T, 3, heads, D});
  const at::Tensor q = q4.select(1, 0), k = q4.select(1, 1), v = q4.select(1, 2);  // [T, heads, D] views
  // rows [a, a + n) of t as [1, heads, n, D]: the layout the attention kernel reads in place
  const auto bhld = [](const at::Tensor& t, int64_t a, int64_t n) {
    return t.narrow(0, a, n).unsqueeze(0).transpose(1, 2);
  };
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  // sequences overlapping [r0, r1): seq is sorted, so start at the last one beginning at or before r0
  int64_t s = std::upper_bound(seq.begin(), seq.end(), r0) - seq.begin() - 1;
  for (; s + 1 < static_cast<int64_t>(seq.size()) && seq[s] < r1; ++s) {
    const int64_t a = std::max(r0, seq[s]), b = std::min(r1, seq[s + 1]);
    if (a >= b) continue;
    at::Tensor yb = bhld(y, a - r0, b - a);
    at::Tensor lse = at::empty({1, heads, b - a}, qkv.options());
    const int64_t k0 = seq[s], kn = seq[s + 1] - seq[s];
    FORKATTN_CPU_DISPATCH(attention_fwd_kernel)(bhld(q, a, b - a), bhld(k, k0, kn), bhld(v, k0, kn), std::nullopt,
                                                false, scale, 0.0, 0, yb, lse);
  }
}

// The layer over x [T, H] (rows of all sequences, packed): sequence s is rows [seq[s], seq[s + 1]),
// row block j is rows [blk[j], blk[j + 1]); a block may hold (parts of) several sequences.
at::Tensor layer_rows(const at::Tensor& x, const std::vector<int64_t>& seq, const std::vector<int64_t>& blk,
                      const at::Tensor& qkv_w, const at::Tensor& qkv_b, const at::Tensor& attn_out_w,
                      const at::Tensor& attn_out_b, const at::Tensor& ln1_w, const at::Tensor& ln1_b, double ln1_eps,
                      const at::Tensor& inter_w, const at::Tensor& inter_b, const at::Tensor& out_w,
                      const at::Tensor& out_b, const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps,
                      int64_t heads, bool packed, int nthreads) {
  const int64_t T = x.size(0), H = x.size(1), D = H / heads, I = inter_b.size(0);
  const int64_t nblk = static_cast<int64_t>(blk.size()) - 1;

  // (A) QKV projection, [T, 3H], row block by row block (a panel weight's GEMM stores into qkv itself)
  at::Tensor qkv = at::empty({T, 3 * H}, x.options());
  run_chunks(nblk, nthreads, [&](int64_t j) {
    const int64_t r0 = blk[j], n = blk[j + 1] - r0;
    if (is_panel(qkv_w))
      panel_gemm(x.narrow(0, r0, n), qkv_w, qkv_b, false, qkv.narrow(0, r0, n), 0, 3 * H);
    else
      qkv.narrow(0, r0, n).copy_(linear(x.narrow(0, r0, n), qkv_w, qkv_b, packed, false));
  });

  // (B) attention for a block of query rows (each part of a sequence against that sequence's keys),
  // then the row-local rest of the layer
  at::Tensor out = at::empty_like(x);
  run_chunks(nblk, nthreads, [&](int64_t j) {
    const int64_t r0 = blk[j], r1 = blk[j + 1], n = r1 - r0;
    at::Tensor y = at::empty({n, heads, D}, x.options());
    attend_rows(qkv, seq, r0, r1, heads, y);
    const at::Tensor xb = x.narrow(0, r0, n);
    at::Tensor h = gemm_new(y.view({n, H}), attn_out_w, H, std::nullopt, false, packed);
    bias_residual_layernorm_cpu(h, xb, attn_out_b, ln1_w, ln1_b, ln1_eps);
    at::Tensor a = gemm_new(h, inter_w, I, inter_b, true, packed);
    at::Tensor o = gemm_new(a, out_w, H, std::nullopt, false, packed);
    bias_residual_layernorm_cpu(o, h, out_b, ln2_w, ln2_b, ln2_eps);
    out.narrow(0, r0, n).copy_(o);
  });
  return out;
}

// in @ W^T over the column parts of W, one part per chunk, into out [rows, N]. Either `parts` is one
// panel weight (gemm_pack_cpu) and a part is a range of its panels (nthreads ranges of nearly equal
// width), each stored straight into its columns of out with the bias (+ GELU) in the GEMM's store;
// or part p is its own [n_p, K] weight, plain or packed, giving output columns [c_p, c_p + n_p), c_p
// the sum of the parts before it, computed into a temporary and copied, its bias slice in its GEMM
// or, with `gelu`, in the bias + exact GELU pass over the part's own columns.
void gemm_cols(const at::Tensor& in, const std::vector<at::Tensor>& parts, const std::optional<at::Tensor>& bias,
               bool gelu, const at::Tensor& out, bool packed, int nthreads) {
  if (parts.size() == 1 && is_panel(parts[0])) {
    const int64_t N = out.size(1), nr = parts[0].size(2), panels = parts[0].size(0);
    const int64_t nparts = std::min<int64_t>(nthreads, panels);
    run_chunks(nparts, nthreads, [&](int64_t p) {
      const int64_t n0 = panels * p / nparts * nr, n1 = std::min(N, panels * (p + 1) / nparts * nr);
      panel_gemm(in, parts[0], bias, gelu, out, n0, n1);
    });
    return;
  }
  std::vector<int64_t> c0(parts.size() + 1, 0);
  for (size_t p = 0; p < parts.size(); ++p) c0[p + 1] = c0[p] + parts[p].size(0);
  run_chunks(static_cast<int64_t>(parts.size()), nthreads, [&](int64_t p) {
    const int64_t n = c0[p + 1] - c0[p];
    std::optional<at::Tensor> b;
    if (bias && !gelu) b = bias->narrow(0, c0[p], n);
    at::Tensor y = linear(in, parts[p], b, packed, false);
    if (gelu) bias_gelu_cpu(y, bias->narrow(0, c0[p], n));
    out.narrow(1, c0[p], n).copy_(y);
  });
}

// The layer over x [T, H] with every GEMM split over output columns (one part per chunk, each with
// all T rows) and the row-local steps over the row blocks blk: for few rows (batch 1 L128), where a
// row split leaves each thread's GEMM a small M. 7 rounds: QKV | attention | out-proj | bias +
// residual + LN | FFN-up + bias + GELU | FFN-down | bias + residual + LN.
at::Tensor layer_cols(const at::Tensor& x, const std::vector<int64_t>& seq, const std::vector<int64_t>& blk,
                      const std::vector<at::Tensor>& qkv_w, const at::Tensor& qkv_b,
                      const std::vector<at::Tensor>& attn_out_w, const at::Tensor& attn_out_b,
                      const at::Tensor& ln1_w, const at::Tensor& ln1_b, double ln1_eps,
                      const std::vector<at::Tensor>& inter_w, const at::Tensor& inter_b,
                      const std::vector<at::Tensor>& out_w, const at::Tensor& out_b, const at::Tensor& ln2_w,
                      const at::Tensor& ln2_b, double ln2_eps, int64_t heads, bool packed, int nthreads) {
  const int64_t T = x.size(0), H = x.size(1), D = H / heads, I = inter_b.size(0);
  const int64_t nblk = static_cast<int64_t>(blk.size()) - 1;
  const auto rows = [&](const at::Tensor& t, int64_t j) { return t.narrow(0, blk[j], blk[j + 1] - blk[j]); };
  at::Tensor qkv = at::empty({T, 3 * H}, x.options());
  gemm_cols(x, qkv_w, qkv_b, false, qkv, packed, nthreads);
  at::Tensor y = at::empty({T, heads, D}, x.options());
  run_chunks(nblk, nthreads, [&](int64_t j) { attend_rows(qkv, seq, blk[j], blk[j + 1], heads, rows(y, j)); });
  at::Tensor h = at::empty({T, H}, x.options());
  gemm_cols(y.view({T, H}), attn_out_w, std::nullopt, false, h, packed, nthreads);
  run_chunks(nblk, nthreads, [&](int64_t j) {
    bias_residual_layernorm_cpu(rows(h, j), rows(x, j), attn_out_b, ln1_w, ln1_b, ln1_eps);
  });
  at::Tensor a = at::empty({T, I}, x.options());
  gemm_cols(h, inter_w, inter_b, true, a, packed, nthreads);
  at::Tensor o = at::empty({T, H}, x.options());
  gemm_cols(a, out_w, std::nullopt, false, o, packed, nthreads);
  run_chunks(nblk, nthreads,
             [&](int64_t j) { bias_residual_layernorm_cpu(rows(o, j), rows(h, j), out_b, ln2_w, ln2_b, ln2_eps); });
  return o;
}

void check_layer(const at::Tensor& x, int64_t dim, const char* shape, int64_t heads, int64_t chunks, int64_t threads,
                 const at::Tensor* const* weights) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  FA_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK_VALUE(x.dim() == dim, "x must be ", shape, ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous, got strides ", x.strides());
  const int64_t H = x.size(-1);
  TORCH_CHECK_VALUE(heads > 0 && H % heads == 0, "heads must be > 0 and divide hidden size ", H, ", got ", heads);
  TORCH_CHECK_VALUE(chunks >= 1, "chunks must be >= 1, got ", chunks);
  TORCH_CHECK_VALUE(threads >= 1, "threads must be >= 1, got ", threads);
  const char* names[] = {"qkv_w", "qkv_b", "attn_out_w", "attn_out_b", "ln1_w", "ln1_b",
                         "inter_w", "inter_b", "out_w", "out_b", "ln2_w", "ln2_b"};
  for (int i = 0; i < 12; ++i) check_weight(*weights[i], names[i]);
  // contiguous: the packed-panel GEMM reads the bias with unit stride in its store
  TORCH_CHECK_VALUE(weights[1]->dim() == 1 && weights[1]->size(0) == 3 * H && weights[1]->is_contiguous(),
                    "qkv_b must be [3 * hidden] = [", 3 * H, "], contiguous, got shape ", weights[1]->sizes(),
                    " with strides ", weights[1]->strides());
  TORCH_CHECK_VALUE(weights[7]->dim() == 1 && weights[7]->is_contiguous(), "inter_b must be a contiguous [intermediate], got shape ",
                    weights[7]->sizes());
  const int64_t I = weights[7]->size(0);
  // panel weights (3-D, gemm_pack_cpu): [panels, K, NR] for the [N, K] the layer needs, NR the width
  // of the CPU kernel variant in use
  const int64_t nk[4][2] = {{3 * H, H}, {H, H}, {I, H}, {H, I}};
  const int gemms[4] = {0, 2, 6, 8};
  for (int g = 0; g < 4; ++g) {
    const at::Tensor& w = *weights[gemms[g]];
    if (is_panel(w)) check_packed_weight(w, nk[g][0], nk[g][1], names[gemms[g]]);
  }
}

// cu_seqlens [batch + 1] (int32 or int64, CPU, from 0 to T, non-decreasing) as a vector, or a
// ValueError/TypeError naming it.
std::vector<int64_t> sequence_starts(const at::Tensor& cu_seqlens, int64_t T) {
  TORCH_CHECK_VALUE(cu_seqlens.device().is_cpu(), "cu_seqlens must be a CPU tensor, got ", cu_seqlens.device());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                   "cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "cu_seqlens must be [batch + 1], got shape ",
                    cu_seqlens.sizes());
  const at::Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  std::vector<int64_t> seq(c, c + cu.numel());
  TORCH_CHECK_VALUE(seq.front() == 0 && seq.back() == T, "cu_seqlens must start at 0 and end at x.size(0) = ", T,
                    ", got ", seq.front(), " .. ", seq.back());
  for (size_t i = 1; i < seq.size(); ++i)
    TORCH_CHECK_VALUE(seq[i] >= seq[i - 1], "cu_seqlens must be non-decreasing, got ", seq[i - 1], " then ", seq[i],
                      " at index ", i);
  return seq;
}

// min(chunks, T) row blocks of (nearly) equal size over T > 0 rows: their starts, then T.
std::vector<int64_t> even_blocks(int64_t T, int64_t chunks) {
  const int64_t blocks = std::min(chunks, T);
  std::vector<int64_t> blk(blocks + 1);
  for (int64_t j = 0; j <= blocks; ++j) blk[j] = j * T / blocks;
  return blk;
}

// A column-split weight: a non-empty list of [n_p, K] parts (n_p >= 1, plain or packed, CPU
// float32) whose n_p sum to N. Returns N.
// A single panel weight (checked by check_layer) counts as its expected N.
int64_t check_parts(const std::vector<at::Tensor>& parts, const char* name, int64_t K, int64_t panel_N) {
  TORCH_CHECK_VALUE(!parts.empty(), name, " must be a non-empty list of [out, in] weight parts, got an empty list");
  if (parts.size() == 1 && is_panel(parts[0])) return panel_N;
  int64_t N = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    check_weight(parts[p], name);
    TORCH_CHECK_VALUE(parts[p].dim() == 2 && parts[p].size(0) >= 1 && parts[p].size(1) == K, name, "[", p,
                      "] must be [out >= 1, ", K, "], got shape ", parts[p].sizes());
    N += parts[p].size(0);
  }
  return N;
}

}  // namespace

at::Tensor encoder_layer_cpu(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                             const at::Tensor& attn_out_w, const at::Tensor& attn_out_b, const at::Tensor& ln1_w,
                             const at::Tensor& ln1_b, double ln1_eps, const at::Tensor& inter_w,
                             const at::Tensor& inter_b, const at::Tensor& out_w, const at::Tensor& out_b,
                             const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps, int64_t heads,
                             bool packed, int64_t chunks, int64_t threads) {
  const at::Tensor* weights[] = {&qkv_w, &qkv_b, &attn_out_w, &attn_out_b, &ln1_w, &ln1_b,
                                 &inter_w, &inter_b, &out_w, &out_b, &ln2_w, &ln2_b};
  check_layer(x, 3, "[batch, seq_len, hidden]", heads, chunks, threads, weights);
  if (x.numel() == 0) return x.clone();
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2);
  const int64_t blocks = std::min(chunks, L);  // row blocks per sequence
  std::vector<int64_t> seq(B + 1), blk;
  for (int64_t b = 0; b <= B; ++b) seq[b] = b * L;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < blocks; ++j) blk.push_back(b * L + j * L / blocks);
  blk.push_back(B * L);
  return layer_rows(x.view({B * L, H}), seq, blk, qkv_w, qkv_b, attn_out_w, attn_out_b, ln1_w, ln1_b, ln1_eps,
                    inter_w, inter_b, out_w, out_b, ln2_w, ln2_b, ln2_eps, heads, packed, static_cast<int>(threads))
      .view({B, L, H});
}

at::Tensor encoder_layer_varlen_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens, const at::Tensor& qkv_w,
                                    const at::Tensor& qkv_b, const at::Tensor& attn_out_w,
                                    const at::Tensor& attn_out_b, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                    double ln1_eps, const at::Tensor& inter_w, const at::Tensor& inter_b,
                                    const at::Tensor& out_w, const at::Tensor& out_b, const at::Tensor& ln2_w,
                                    const at::Tensor& ln2_b, double ln2_eps, int64_t heads, bool packed,
                                    int64_t chunks, int64_t threads) {
  const at::Tensor* weights[] = {&qkv_w, &qkv_b, &attn_out_w, &attn_out_b, &ln1_w, &ln1_b,
                                 &inter_w, &inter_b, &out_w, &out_b, &ln2_w, &ln2_b};
  check_layer(x, 2, "[tokens, hidden]", heads, chunks, threads, weights);
  const std::vector<int64_t> seq = sequence_starts(cu_seqlens, x.size(0));
  const int64_t T = x.size(0);
  if (T == 0) return x.clone();
  const std::vector<int64_t> blk = even_blocks(T, chunks);
  return layer_rows(x, seq, blk, qkv_w, qkv_b, attn_out_w, attn_out_b, ln1_w, ln1_b, ln1_eps, inter_w, inter_b,
                    out_w, out_b, ln2_w, ln2_b, ln2_eps, heads, packed, static_cast<int>(threads));
}

at::Tensor encoder_layer_cols_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens, const std::vector<at::Tensor>& qkv_w,
                                  const at::Tensor& qkv_b, const std::vector<at::Tensor>& attn_out_w,
                                  const at::Tensor& attn_out_b, const at::Tensor& ln1_w, const at::Tensor& ln1_b,
                                  double ln1_eps, const std::vector<at::Tensor>& inter_w, const at::Tensor& inter_b,
                                  const std::vector<at::Tensor>& out_w, const at::Tensor& out_b,
                                  const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps, int64_t heads,
                                  bool packed, int64_t chunks, int64_t threads) {
  TORCH_CHECK_VALUE(!qkv_w.empty(), "qkv_w must be a non-empty list of [out, in] weight parts, got an empty list");
  TORCH_CHECK_VALUE(!attn_out_w.empty(), "attn_out_w must be a non-empty list of [out, in] weight parts, got an empty list");
  TORCH_CHECK_VALUE(!inter_w.empty(), "inter_w must be a non-empty list of [out, in] weight parts, got an empty list");
  TORCH_CHECK_VALUE(!out_w.empty(), "out_w must be a non-empty list of [out, in] weight parts, got an empty list");
  const at::Tensor* weights[] = {&qkv_w[0], &qkv_b, &attn_out_w[0], &attn_out_b, &ln1_w, &ln1_b,
                                 &inter_w[0], &inter_b, &out_w[0], &out_b, &ln2_w, &ln2_b};
  check_layer(x, 2, "[tokens, hidden]", heads, chunks, threads, weights);
  const int64_t T = x.size(0), H = x.size(1);
  const std::vector<int64_t> seq = sequence_starts(cu_seqlens, T);
  const auto check_n = [](int64_t got, int64_t want, const char* name) {
    TORCH_CHECK_VALUE(got == want, name, "'s parts must have ", want, " output rows in all, got ", got);
  };
  check_n(check_parts(qkv_w, "qkv_w", H, 3 * H), 3 * H, "qkv_w");
  check_n(check_parts(attn_out_w, "attn_out_w", H, H), H, "attn_out_w");
  const int64_t I = check_parts(inter_w, "inter_w", H, inter_b.size(0));
  TORCH_CHECK_VALUE(inter_b.dim() == 1 && inter_b.size(0) == I, "inter_b must be [", I,
                    "] (the rows of inter_w's parts), got ", inter_b.sizes());
  check_n(check_parts(out_w, "out_w", I, H), H, "out_w");
  if (T == 0) return x.clone();
  return layer_cols(x, seq, even_blocks(T, chunks), qkv_w, qkv_b, attn_out_w, attn_out_b, ln1_w, ln1_b, ln1_eps,
                    inter_w, inter_b, out_w, out_b, ln2_w, ln2_b, ln2_eps, heads, packed, static_cast<int>(threads));
}

}  // namespace forkattn
