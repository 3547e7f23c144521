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
// attention against all keys, then the output projection + bias + residual + LayerNorm, the FFN
// with its GELU and the second bias + residual + LayerNorm, all of which are row-local.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "attention.h"
#include "checks.h"
#include "encoder.h"

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
      round_ = r;
      state_.store(kQueued);
    }
    cv_.notify_all();
  }
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
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      cv_.wait(lock, [&] { return stop_ || state_.load() == kQueued; });
      if (stop_) return;
      int expected = kQueued;
      if (!state_.compare_exchange_strong(expected, kRunning)) continue;  // revoked meanwhile
      Round* r = round_;
      lock.unlock();
      r->work();
      state_.store(kIdle, std::memory_order_release);
      lock.lock();
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  std::atomic<int> state_{kIdle};
  Round* round_ = nullptr;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the fields above exist
};

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
    for (int64_t h = 0; h < want; ++h) helpers[h]->post(&round);
    round.work();
    for (int64_t h = 0; h < want; ++h) helpers[h]->finish();
  }
  if (round.err) std::rethrow_exception(round.err);
}

// x @ w^T (+ bias) (+ exact GELU): oneDNN's packed linear when `packed`, else at::linear.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool packed,
                  bool gelu) {
  if (!packed) {
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

void check_weight(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  FA_CHECK_DTYPE_NAMED(t, name, at::kFloat);
}

}  // namespace

at::Tensor encoder_layer_cpu(const at::Tensor& x, const at::Tensor& qkv_w, const at::Tensor& qkv_b,
                             const at::Tensor& attn_out_w, const at::Tensor& attn_out_b, const at::Tensor& ln1_w,
                             const at::Tensor& ln1_b, double ln1_eps, const at::Tensor& inter_w,
                             const at::Tensor& inter_b, const at::Tensor& out_w, const at::Tensor& out_b,
                             const at::Tensor& ln2_w, const at::Tensor& ln2_b, double ln2_eps, int64_t heads,
                             bool packed, int64_t chunks, int64_t threads) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x must be a CPU tensor, got ", x.device());
  FA_CHECK_DTYPE(x, at::kFloat);
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be [batch, seq_len, hidden], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.is_contiguous(), "x must be contiguous, got strides ", x.strides());
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2);
  TORCH_CHECK_VALUE(heads > 0 && H % heads == 0, "heads must be > 0 and divide hidden size ", H, ", got ", heads);
  TORCH_CHECK_VALUE(chunks >= 1, "chunks must be >= 1, got ", chunks);
  TORCH_CHECK_VALUE(threads >= 1, "threads must be >= 1, got ", threads);
  const at::Tensor* weights[] = {&qkv_w, &qkv_b, &attn_out_w, &attn_out_b, &ln1_w, &ln1_b,
                                 &inter_w, &inter_b, &out_w, &out_b, &ln2_w, &ln2_b};
  const char* names[] = {"qkv_w", "qkv_b", "attn_out_w", "attn_out_b", "ln1_w", "ln1_b",
                         "inter_w", "inter_b", "out_w", "out_b", "ln2_w", "ln2_b"};
  for (int i = 0; i < 12; ++i) check_weight(*weights[i], names[i]);
  TORCH_CHECK_VALUE(qkv_b.dim() == 1 && qkv_b.size(0) == 3 * H, "qkv_b must be [3 * hidden] = [", 3 * H,
                    "], got ", qkv_b.sizes());
  if (x.numel() == 0) return x.clone();
  const int64_t D = H / heads;
  const int64_t blocks = std::min(chunks, L);  // row blocks per sequence
  const auto block = [&](int64_t i) {          // chunk i -> (batch, first row, rows)
    const int64_t b = i / blocks, j = i % blocks;
    const int64_t r0 = j * L / blocks, r1 = (j + 1) * L / blocks;
    return std::make_tuple(b, r0, r1 - r0);
  };
  const int nthreads = static_cast<int>(threads);

  // (A) QKV projection, [B, L, 3H], row block by row block
  at::Tensor qkv = at::empty({B, L, 3 * H}, x.options());
  run_chunks(B * blocks, nthreads, [&](int64_t i) {
    auto [b, r0, n] = block(i);
    qkv[b].narrow(0, r0, n).copy_(linear(x[b].narrow(0, r0, n), qkv_w, qkv_b, packed, false));
  });

  // (B) attention for a block of query rows, then the row-local rest of the layer
  const at::Tensor q5 = qkv.view({B, L, 3, heads, D});
  const at::Tensor q = q5.select(2, 0).transpose(1, 2), k = q5.select(2, 1).transpose(1, 2),
                   v = q5.select(2, 2).transpose(1, 2);  // [B, heads, L, D] views
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  at::Tensor out = at::empty_like(x);
  run_chunks(B * blocks, nthreads, [&](int64_t i) {
    auto [b, r0, n] = block(i);
    const at::Tensor qb = q.narrow(0, b, 1).narrow(2, r0, n);
    at::Tensor y = empty_bhld(qb, 1, heads, n, D);  // memory [1, n, heads, D]: rows of H
    at::Tensor lse = at::empty({1, heads, n}, x.options());
    FORKATTN_CPU_DISPATCH(attention_fwd_kernel)(qb, k.narrow(0, b, 1), v.narrow(0, b, 1), std::nullopt, false, scale, 0.0, 0, y, lse);
    const at::Tensor xb = x[b].narrow(0, r0, n);
    at::Tensor h = linear(y.transpose(1, 2).reshape({n, H}), attn_out_w, std::nullopt, packed, false);
    bias_residual_layernorm_cpu(h, xb, attn_out_b, ln1_w, ln1_b, ln1_eps);
    at::Tensor a;
    if (packed) {
      a = linear(h, inter_w, inter_b, true, true);  // oneDNN's bias + erf-GELU post-op
    } else {
      a = linear(h, inter_w, std::nullopt, false, false);
      bias_gelu_cpu(a, inter_b);
    }
    at::Tensor o = linear(a, out_w, std::nullopt, packed, false);
    bias_residual_layernorm_cpu(o, h, out_b, ln2_w, ln2_b, ln2_eps);
    out[b].narrow(0, r0, n).copy_(o);
  });
  return out;
}

}  // namespace forkattn
