// Device building blocks of the attention kernels (sm_80+): mma.sync m16n8k16 with fp32
// accumulators, ldmatrix, cp.async, and tile moves between global and shared memory.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), lane = 4 * g + t:
//   A (16x16, row-major), 4 x b32: {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..}
//   B (16x8, "col"), 2 x b32:      {k 2t..2t+1, col g}, {k 2t+8..2t+9, col g}
//   C (16x8, fp32), 4 x f32:       (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// A C tile pair covering 16 columns converts in registers into the A fragment of a
// following mma whose k runs over those columns (pack_a below): no shared-memory round trip.
//
// Shared-memory tiles are row-major with rows padded by 8 elements (16 bytes), which keeps
// every ldmatrix phase and the 4-byte fragment stores free of bank conflicts.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace forkattn::kernels::attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Smem {
  static constexpr int kRow = D + 8;  // padded row length in elements
};

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// --- conversions ------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}

// The A fragment (16 x 16, k over 16 columns) from two fp32 C tiles c0 (columns 0-7) and
// c1 (columns 8-15) of the same 16 rows.
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// --- tensor-core and memory instructions -------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i
// receives matrix i in the A/B fragment order (row lane/4, columns 2*(lane%4), +1).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte asynchronous copy; zero-fills the destination when !valid (src is not read then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// --- operand fragments from shared-memory tiles (row length Smem<D>::kRow) ----------------------

// A fragment of rows r0..r0+15, columns c0..c0+15 of a row-major tile (x[row][col]).
template <int ROW>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const void* tile, int r0, int c0, int lane) {
  const auto* base = static_cast<const uint16_t*>(tile);
  ldsm_x4(a, base + (r0 + (lane & 15)) * ROW + c0 + (lane >> 4) * 8);
}
// B fragments for two n-tiles (n0..n0+7 in b[0..1], n0+8..15 in b[2..3]), k0..k0+15, where the
// tile is stored [n][k] (B^T row-major: K for Q K^T).
template <int ROW>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const void* tile, int n0, int k0, int lane) {
  const auto* base = static_cast<const uint16_t*>(tile);
  ldsm_x4(b, base + (n0 + (lane & 7) + (lane >> 4) * 8) * ROW + k0 + ((lane >> 3) & 1) * 8);
}
// The same where the tile is stored [k][n] (B row-major: V for P V).
template <int ROW>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const void* tile, int n0, int k0, int lane) {
  const auto* base = static_cast<const uint16_t*>(tile);
  ldsm_x4_t(b, base + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW + n0 + (lane >> 4) * 8);
}

// c[M/16 rows per warp are fixed at 16][N/8 tiles] += A (16 x K from `a_tile` rows r0..) * B.
// B stored [n][k] (B_NK) or [k][n]. K_UNROLL: how many of the K / 16 steps to unroll (all by
// default; fewer keeps ptxas from loading every step's fragments at once where registers are short).
template <typename T, int ROW, int K, int N, bool B_NK, int K_UNROLL = K / 16>
__device__ __forceinline__ void mma_tile_smem_a(float (&c)[N / 8][4], const void* a_tile, int r0, const void* b_tile,
                                                int lane) {
  auto step = [&](int kk) {
    uint32_t a[4];
    load_a<ROW>(a, a_tile, r0, kk * 16, lane);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      uint32_t b[4];
      if constexpr (B_NK) {
        load_b_nk<ROW>(b, b_tile, j * 16, kk * 16, lane);
      } else {
        load_b_kn<ROW>(b, b_tile, j * 16, kk * 16, lane);
      }
      mma16816<T>(c[2 * j], a, b[0], b[1]);
      mma16816<T>(c[2 * j + 1], a, b[2], b[3]);
    }
  };
  if constexpr (K_UNROLL == K / 16) {  // a plain full unroll (an unroll count moves ptxas' allocation)
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) step(kk);
  } else {
#pragma unroll(K_UNROLL)
    for (int kk = 0; kk < K / 16; ++kk) step(kk);
  }
}

// c[N/8 tiles] += P (16 x K held as fp32 C tiles p[K/8], rounded to T) * B, B stored [k][n].
template <typename T, int ROW, int K, int N>
__device__ __forceinline__ void mma_tile_reg_a(float (&c)[N / 8][4], const float (&p)[K / 8][4], const void* b_tile,
                                               int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    pack_a<T>(a, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {
      uint32_t b[4];
      load_b_kn<ROW>(b, b_tile, j * 16, kk * 16, lane);
      mma16816<T>(c[2 * j], a, b[0], b[1]);
      mma16816<T>(c[2 * j + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&c)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.f;
}

// --- tiles between global and shared memory ------------------------------------------------------

// Rows row0..row0+ROWS-1 of a [rows, D] matrix (row stride in elements) into a padded tile;
// rows >= n_rows, and rows with keep[row] false when keep is given (padded keys), are zero-filled:
// garbage there (inf, NaN) must not reach an mma, where P = 0 times NaN is NaN.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* g, int64_t row_stride, int row0, int n_rows,
                                                int tid, const bool* keep = nullptr) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % THREADS == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < n_rows && (keep == nullptr || keep[row0 + r]);
    const T* src = valid ? g + static_cast<int64_t>(row0 + r) * row_stride + c * 8 : g;
    cp_async16(tile + r * Smem<D>::kRow + c * 8, src, valid);
  }
}

// A warp's 16 x D fp32 accumulator (C tiles), times `mul`, as T into rows r0..r0+15 of a tile
// (row length ROW: a tile of D columns, or D columns of a wider tile).
template <typename T, int D, int ROW = Smem<D>::kRow>
__device__ __forceinline__ void stage_rows(T* tile, int r0, const float (&c)[D / 8][4], float mul0, float mul1,
                                           int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    *reinterpret_cast<uint32_t*>(tile + (r0 + g) * ROW + j * 8 + 2 * t) = pack2<T>(c[j][0] * mul0, c[j][1] * mul0);
    *reinterpret_cast<uint32_t*>(tile + (r0 + g + 8) * ROW + j * 8 + 2 * t) = pack2<T>(c[j][2] * mul1, c[j][3] * mul1);
  }
}

// A staged tile to global rows row0.. (only rows < n_rows), 16 bytes per access; D columns of a
// tile of row length ROW.
template <int ROWS, int D, int THREADS, typename T, int ROW = Smem<D>::kRow>
__device__ __forceinline__ void store_tile(T* g, int64_t row_stride, int row0, int n_rows, const T* tile, int tid) {
  constexpr int kChunks = D / 8;
  static_assert((ROWS * kChunks) % THREADS == 0, "tile copy must divide evenly among threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int r = idx / kChunks, c = idx % kChunks;
    if (row0 + r < n_rows) {
      *reinterpret_cast<uint4*>(g + static_cast<int64_t>(row0 + r) * row_stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + r * ROW + c * 8);
    }
  }
}

// Zeros into global rows row0..row0+ROWS-1 (< n_rows) of a [rows, D] matrix.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void store_zeros(T* g, int64_t row_stride, int row0, int n_rows, int tid) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int idx = tid + i * THREADS;
    const int r = idx / kChunks, c = idx % kChunks;
    if (row0 + r < n_rows) {
      *reinterpret_cast<uint4*>(g + static_cast<int64_t>(row0 + r) * row_stride + c * 8) = make_uint4(0, 0, 0, 0);
    }
  }
}

// First key tile at or after n (< n_tiles) holding a visible key, else n_tiles; writes that
// tile's per-key bias (0 visible, -inf padded or past len_k) to bias[0..BN). Block-uniform:
// every thread must call it with the same n (it contains barriers when mask != nullptr).
template <int BN, int THREADS>
__device__ __forceinline__ int next_key_tile(int n, int n_tiles, const bool* mask, int len_k, float* bias, int tid) {
  static_assert(BN <= THREADS, "one thread per key of a tile");
  for (; n < n_tiles; ++n) {
    const int key = n * BN + tid;
    const bool visible = tid < BN && key < len_k && (mask == nullptr || mask[key]);
    if (mask == nullptr || __syncthreads_or(visible)) {
      if (tid < BN) bias[tid] = visible ? 0.f : -INFINITY;
      return n;
    }
  }
  return n;
}

// A forward pass's first loads, as two cp.async groups: the Q tile; then K and V of the first key
// tile holding a visible key into stage 0 (its bias into bias[0..BN), next_key_tile). Returns that
// tile's index, n_tiles if there is none. Block-uniform.
template <int BM, int BN, int D, int THREADS, typename T>
__device__ __forceinline__ int load_first_tiles(T* sQ, T* sK, T* sV, float* bias, const T* q, int64_t q_row_stride,
                                                int m0, int len_q, const T* k, int64_t k_row_stride, const T* v,
                                                int64_t v_row_stride, int n_tiles, const bool* mask, int len_k,
                                                int tid) {
  load_tile_async<BM, D, THREADS>(sQ, q, q_row_stride, m0, len_q, tid);
  cp_async_commit();
  const int n = next_key_tile<BN, THREADS>(0, n_tiles, mask, len_k, bias, tid);
  if (n < n_tiles) {
    load_tile_async<BN, D, THREADS>(sK, k, k_row_stride, n * BN, len_k, tid, mask);
    load_tile_async<BN, D, THREADS>(sV, v, v_row_stride, n * BN, len_k, tid, mask);
  }
  cp_async_commit();
  return n;
}

// max / sum over the 4 lanes sharing a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// One key tile's step of the online softmax (base 2) for a warp's two fragment rows (g and g + 8
// of its 16): s holds the tile's scaled scores (-inf where not visible) and becomes exp2(s - the
// new running max); row_max, row_sum (this lane's partial sums, reduced over the quad at the end)
// and the output accumulator acc move to the new max. A row with nothing visible yet stays at
// max -inf, sum 0 (exp2 against base 0, never inf - inf).
template <int N, int M>
__device__ __forceinline__ void online_softmax_step(float (&s)[N][4], float (&acc)[M][4], float (&row_max)[2],
                                                    float (&row_sum)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = row_max[r];
#pragma unroll
    for (int j = 0; j < N; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = quad_max(mx);
    const float base = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(row_max[r] - base);
    row_max[r] = mx;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - base);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
      sum += s[j][2 * r] + s[j][2 * r + 1];
    }
    row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
    for (int j = 0; j < M; ++j) {
      acc[j][2 * r] *= alpha;
      acc[j][2 * r + 1] *= alpha;
    }
  }
}

// A forward pass's end for a warp's two fragment rows row_base and row_base + 8: the output rows
// times out_mul / l (l the quad's row sum; a row that sees no key, l == 0, writes zeros, a NaN score
// makes the row NaN as in eager) staged into the warp's own rows of sQ, and lse (natural log, +inf
// where l == 0) into lse_rows[row] by one lane per row below len_q.
template <typename T, int D>
__device__ __forceinline__ void finish_rows(T* sQ, const float (&acc)[D / 8][4], const float (&row_max)[2],
                                            const float (&row_sum)[2], float out_mul, float* lse_rows, int row_base,
                                            int len_q, int warp, int lane) {
  float mul[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const int row = row_base + r * 8;
    mul[r] = l != 0.f ? out_mul / l : 0.f;
    if ((lane & 3) == 0 && row < len_q) lse_rows[row] = l != 0.f ? (row_max[r] + log2f(l)) * kLn2 : INFINITY;
  }
  stage_rows<T, D>(sQ, warp * 16, acc, mul[0], mul[1], lane);  // each warp reuses its own Q rows
}

// The rows of batch entry b: the whole padded batch entry, or one packed sequence (varlen).
struct Sequence {
  int q_start, k_start;  // first row in q and in k (0 unless varlen)
  int len_q, len_k;
};
template <typename Params>
__device__ __forceinline__ Sequence sequence(const Params& p, int b) {
  if (p.cu_seqlens_q == nullptr) return {0, 0, p.len_q, p.len_k};
  const int qs = p.cu_seqlens_q[b], ks = p.cu_seqlens_k[b];
  return {qs, ks, p.cu_seqlens_q[b + 1] - qs, p.cu_seqlens_k[b + 1] - ks};
}

// Dynamic shared memory above 48 KB needs an opt-in per kernel.
template <typename Kernel>
inline cudaError_t set_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace forkattn::kernels::attention
