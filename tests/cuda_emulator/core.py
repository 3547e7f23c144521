"""The reusable SM80 model under the kernel transcriptions: a block's threads, global and shared
memory with bounds checks and a race detector, cp.async, ldmatrix, mma.sync; HostTensor, a torch
tensor's storage as a global buffer (what a host file's data_ptr() and strides hand a kernel).

- Threads: the 128 threads of a block are vectors over threadIdx.x (TID; WARP = tid / 32,
  LANE = tid % 32, G = lane >> 2, TQ = lane & 3), so a per-thread formula is evaluated for every
  lane at once; shfl_xor(x, o) reads the partner lane's pre-shuffle value. Blocks run one after
  another; threads run in lock-step between barriers.
- Global memory (GBuf, Ptr): a tensor's storage as a flat NumPy array, every access bounds-checked
  (also against a negative index, which NumPy would wrap silently), 16-byte accesses checked for
  alignment, optionally write-once (a second write of an element raises: two threads or blocks
  would race on it). Callers poison outputs and workspaces with NaN.
- Shared memory (Smem): one byte array of the kernel's size, poisoned with NaN bytes, viewed as
  fp16 / fp32 / int32 exactly as the kernel's carve-up aliases it, bounds- and alignment-checked.
  A race detector over barrier epochs (barrier(), syncthreads_or() end an epoch): a read of bytes
  with a cp.async in flight, a read of bytes written in the same epoch by another thread, and a
  write (or cp.async issue) to bytes read or written in the same epoch by another thread all
  raise. This is stricter than the hardware (no __syncwarp assumed).
- cp.async.cg 16 B with the zero-fill predicate (src-size 0: source not read), commit_group and
  wait_group N: copies land in shared memory only when their group completes.
- ldmatrix.x4 (and .trans) per lane: lanes 8i..8i+7 give the row addresses of matrix i (each must
  be 16-byte aligned); lane l receives, in register i, row l/4, elements 2(l%4), 2(l%4)+1 of
  matrix i (of its transpose with .trans). mma.sync m16n8k16 .row.col f32.f16.f16.f32 per lane
  with the PTX ISA fragment layouts (groupID g = lane >> 2, threadID_in_group t = lane % 4):
      A: a0,a1 (g, 2t+i)  a2,a3 (g+8, 2t+i)  a4,a5 (g, 2t+8+i)  a6,a7 (g+8, 2t+8+i)
      B: b0,b1 (k=2t+i, n=g)  b2,b3 (k=2t+8+i, n=g)
      C/D: c0,c1 (g, 2t+i)  c2,c3 (g+8, 2t+i)
  These tables are written from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating
  point type", "ldmatrix"), cross-checked against CuTe's SM80 16x8x16 ALayout/BLayout/CLayout
  (as ported in MoYe.jl src/traits/mma_sm80.jl) and TVM's ldmatrix notes ("lane 8*matrix+row
  provides that row's address; word (matrix, row, word) belongs to lane 4*row+word"), not from
  any kernel; mma_layout_self_check() checks they are bijections (at import).
- Numerics: fp32 as np.float32; products of an mma exact (float64) then added to the fp32
  accumulator and rounded; fp16 rounding round-to-nearest-even as __floats2half2_rn (round_h).

What it cannot prove
- Warp scheduling and memory ordering: the race detector only sees conflicts between barrier
  epochs on shared memory (not global-memory ordering, not a missing __syncwarp inside a warp
  beyond the strict rule above).
- Barrier divergence: control flow is emulated block-wide; a barrier under a thread-dependent
  condition would not be caught.
- Exact rounding of the tensor cores (their internal accumulation order/precision), of exp2f/log2f
  (ex2.approx) and of FMA contraction; register allocation, spills, occupancy, smem opt-in limits.
- Anything the compiler does differently from the source (e.g. a miscompile).
"""
import numpy as np
import torch

NT = 128  # threads per block of the attention and decode kernels
TID = np.arange(NT)
WARP, LANE = TID // 32, TID % 32
G, TQ = LANE >> 2, LANE & 3
F32 = np.float32
INF = np.float32(np.inf)


class EmulationError(AssertionError):
    """An out-of-bounds or misaligned access, a race, a double write: a kernel bug."""


# --- global memory ---------------------------------------------------------------------------------

class GBuf:
    """A tensor's storage as a flat array; every access bounds-checked."""

    def __init__(self, name, arr, write_once=False):
        self.name, self.a = name, np.ascontiguousarray(arr).reshape(-1).copy()
        self.writes = np.zeros(self.a.size, np.int32) if write_once else None

    def _check(self, off, n, align):
        off = np.asarray(off, np.int64)
        if off.size and (off.min() < 0 or off.max() + n > self.a.size):
            bad = off[(off < 0) | (off + n > self.a.size)][0]
            raise EmulationError(f"out-of-bounds access to {self.name}: element {bad} (+{n}) of {self.a.size}")
        if align and off.size and np.any(off % align):
            raise EmulationError(f"misaligned {n}-element access to {self.name} at element {off[off % align != 0][0]}")
        return off

    def read(self, off, n=1, align=0):
        off = self._check(off, n, align)
        idx = off[..., None] + np.arange(n) if n > 1 else off
        return self.a[idx] if self.a.dtype.kind in "biu" else self.a[idx].astype(F32)  # ints exact

    def write(self, off, vals, n=1, align=0):
        off = self._check(off, n, align)
        idx = off[..., None] + np.arange(n) if n > 1 else off
        if self.writes is not None:
            flat = idx.reshape(-1)
            if np.unique(flat).size != flat.size or np.any(self.writes[flat]):
                raise EmulationError(f"element of {self.name} written twice (a race between threads/blocks)")
            self.writes[flat] += 1
        self.a[idx] = np.asarray(vals).reshape(idx.shape)


class Ptr:
    """A typed global pointer: buffer + element offset (pointer arithmetic never faults)."""

    def __init__(self, buf, off=0):
        self.buf, self.off = buf, int(off)

    def __add__(self, n):
        return Ptr(self.buf, self.off + int(n))


class HostTensor:
    """A torch tensor's storage as a GBuf plus its view (sizes, strides, storage offset)."""

    def __init__(self, name, t, poison=False, write_once=False):
        t = t.detach()
        n = t.untyped_storage().nbytes() // t.element_size()
        flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,)).clone()
        if poison:
            flat.fill_(float("nan"))
        self.dtype, self.shape, self.stride, self.offset = t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset()
        self.buf = GBuf(name, flat.numpy(), write_once=write_once)

    def ptr(self):
        return Ptr(self.buf, self.offset)

    def view(self, shape=None, stride=None, offset=None):
        """A strided view of the same storage (the host's unsqueeze/transpose), as a HostTensor."""
        v = HostTensor.__new__(HostTensor)
        v.dtype, v.buf = self.dtype, self.buf
        v.shape = self.shape if shape is None else tuple(shape)
        v.stride = self.stride if stride is None else tuple(stride)
        v.offset = self.offset if offset is None else offset
        return v

    def tensor(self):
        return torch.as_strided(torch.from_numpy(self.buf.a.copy()), self.shape, self.stride, self.offset)


# --- shared memory with a barrier-epoch race detector ----------------------------------------------

class Smem:
    def __init__(self, nbytes):
        assert nbytes % 4 == 0
        self.nbytes = nbytes
        self.raw = np.full(nbytes, 0xFF, np.uint8)  # NaN as fp16 and as fp32
        self.h, self.f, self.i = self.raw.view(np.float16), self.raw.view(np.float32), self.raw.view(np.int32)
        nh = nbytes // 2  # race bookkeeping per 2-byte half word
        self.w_epoch = np.full(nh, -1, np.int64)
        self.w_tid = np.full(nh, -1, np.int64)
        self.r_epoch = np.full(nh, -1, np.int64)
        self.r_tid = np.full(nh, -1, np.int64)
        self.pending = np.zeros(nh, bool)
        self.epoch = 0
        self.groups, self.cur = [], []

    # addresses are byte offsets; `n` half words per thread, tid per row of `addr`
    def _hw(self, addr, nh, align):
        addr = np.asarray(addr, np.int64)
        if addr.size and (addr.min() < 0 or addr.max() + 2 * nh > self.nbytes):
            raise EmulationError(f"shared-memory access out of bounds: byte {addr.max()} (+{2 * nh}) of {self.nbytes}")
        if addr.size and np.any(addr % align):
            raise EmulationError(f"misaligned shared-memory access ({align} bytes) at byte {addr[addr % align != 0][0]}")
        return addr[..., None] // 2 + np.arange(nh)

    def _on_read(self, hw, tid):
        tid = np.broadcast_to(np.asarray(tid)[..., None], hw.shape)
        if self.pending[hw].any():
            raise EmulationError("shared memory read while a cp.async into it is in flight (missing wait/barrier)")
        bad = (self.w_epoch[hw] == self.epoch) & (self.w_tid[hw] != tid)
        if bad.any():
            raise EmulationError("shared memory read of data another thread wrote in the same barrier epoch (race)")
        prev = np.where((self.r_epoch[hw] == self.epoch) & (self.r_tid[hw] != tid), -2, tid)
        self.r_epoch[hw] = self.epoch
        self.r_tid[hw] = prev
        clash = self.r_tid[hw] != prev  # several threads of this access read the same half word
        self.r_tid[hw[clash]] = -2

    def _on_write(self, hw, tid):
        tid = np.broadcast_to(np.asarray(tid)[..., None], hw.shape)
        if self.pending[hw].any():
            raise EmulationError("shared memory written while a cp.async into it is in flight")
        war = (self.r_epoch[hw] == self.epoch) & (self.r_tid[hw] != tid)
        waw = (self.w_epoch[hw] == self.epoch) & (self.w_tid[hw] != tid)
        if war.any() or waw.any():
            raise EmulationError("shared memory overwritten in the barrier epoch where another thread uses it (race)")
        self.w_epoch[hw] = self.epoch
        self.w_tid[hw] = tid

    def read_h(self, addr, tid, n=1, align=2):
        hw = self._hw(addr, n, align)
        self._on_read(hw, tid)
        return self.h[hw].astype(F32)

    def write_h(self, addr, vals, tid, n=1, align=2):
        hw = self._hw(addr, n, align)
        self._on_write(hw, tid)
        self.h[hw] = np.asarray(vals, np.float32).astype(np.float16).reshape(hw.shape)

    def read_f(self, addr, tid, n=1, align=4):
        """fp32 values: one per address, or n consecutive ones ([..., n]; a float4 is n=4, align=16)."""
        hw = self._hw(addr, 2 * n, align)
        self._on_read(hw, tid)
        return self.f[hw[..., 0] // 2] if n == 1 else self.f[hw[..., ::2] // 2]

    def write_f(self, addr, vals, tid):
        hw = self._hw(addr, 2, 4)
        self._on_write(hw, tid)
        self.f[hw[..., 0] // 2] = vals

    def read_i(self, addr, tid):
        hw = self._hw(addr, 2, 4)
        self._on_read(hw, tid)
        return self.i[hw[..., 0] // 2]

    def write_i(self, addr, vals, tid):
        hw = self._hw(addr, 2, 4)
        self._on_write(hw, tid)
        self.i[hw[..., 0] // 2] = vals

    def cp_async16(self, dst, vals, tid):
        """cp.async.cg 16 B: vals [N, 8] fp16 values (zeros where the predicate was false)."""
        hw = self._hw(dst, 8, 16)
        t = np.broadcast_to(np.asarray(tid)[..., None], hw.shape)
        war = (self.r_epoch[hw] == self.epoch) & (self.r_tid[hw] != t)
        if war.any() or self.pending[hw].any():
            raise EmulationError("cp.async issued into shared memory another thread reads in this epoch (race)")
        self.pending[hw] = True
        self.cur.append((hw, np.asarray(vals, F32), t))

    def commit(self):
        self.groups.append(self.cur)
        self.cur = []

    def wait(self, n):
        while len(self.groups) > n:
            for hw, vals, t in self.groups.pop(0):
                self.pending[hw] = False
                self.h[hw] = vals.astype(np.float16)
                self.w_epoch[hw] = self.epoch
                self.w_tid[hw] = t

    def barrier(self):
        self.epoch += 1


def syncthreads_or(sm, pred):
    sm.barrier()
    return bool(np.any(pred))


def shfl_xor(x, lane_mask):
    """__shfl_xor_sync(0xffffffff, x, lane_mask) for all 128 threads: the partner's value before
    the shuffle (lane_mask < 32 keeps the partner in the warp)."""
    return x[TID ^ lane_mask]


def cp_async16_from(sm, dst, g, src, valid, tid):
    """cp.async.cg 16 B per thread from global buffer g (element offsets src, 8 fp16 each) to
    shared byte addresses dst; where valid is False src-size is 0: the source is not read and the
    16 bytes are zero-filled."""
    vals = np.zeros((len(dst), 8), F32)
    if valid.any():
        vals[valid] = g.read(src[valid], n=8, align=8)
    sm.cp_async16(dst, vals, tid)


# --- fragments, ldmatrix, mma (PTX ISA layouts) ------------------------------------------------------

_l = np.arange(32)
_g, _t = _l >> 2, _l & 3
_e = np.arange(2)
# A: reg r, half e of lane l -> (row, col) of the 16x16 A tile
A_ROW = np.stack([_g, _g + 8, _g, _g + 8], 1)[:, :, None] + 0 * _e          # [32, 4, 2]
A_COL = np.stack([2 * _t, 2 * _t, 2 * _t + 8, 2 * _t + 8], 1)[:, :, None] + _e
# B: reg r (b0/b1), half e -> (k, n) of the 16x8 B tile
B_K = np.stack([2 * _t, 2 * _t + 8], 1)[:, :, None] + _e                    # [32, 2, 2]
B_N = np.stack([_g, _g], 1)[:, :, None] + 0 * _e
# C: element c of lane l -> (row, col) of the 16x8 C tile
C_ROW = np.stack([_g, _g, _g + 8, _g + 8], 1)                               # [32, 4]
C_COL = np.stack([2 * _t, 2 * _t + 1, 2 * _t, 2 * _t + 1], 1)


def mma_layout_self_check():
    for rows, cols, shape in ((A_ROW, A_COL, (16, 16)), (B_K, B_N, (16, 8)), (C_ROW, C_COL, (16, 8))):
        seen = np.zeros(shape, int)
        np.add.at(seen, (rows.reshape(-1), cols.reshape(-1)), 1)
        assert (seen == 1).all(), "fragment layout is not a bijection"


mma_layout_self_check()


def round_h(x):
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def ldsm_x4(sm, addr, trans=False):
    """ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16; addr: byte address per thread [128].
    Returns registers [128, 4, 2] (two b16 halves each, as fp32 values)."""
    rows = np.asarray(addr, np.int64).reshape(4, 4, 8)  # warp, matrix i (lanes 8i..8i+7), row r
    readers = (WARP.reshape(4, 4, 8) * 32 + np.arange(4)[None, :, None] * 8 + np.arange(8)[None, None, :])
    m = sm.read_h(rows, readers, n=8, align=16)  # [warp, i, row, col]
    w = np.arange(4)[:, None, None, None]
    i = np.arange(4)[None, None, :, None]
    lg, lt = _g[None, :, None, None], _t[None, :, None, None]
    e = _e[None, None, None, :]
    out = m[w, i, lg, 2 * lt + e] if not trans else m[w, i, 2 * lt + e, lg]  # [4, 32, 4, 2]
    return out.reshape(NT, 4, 2)


def mma16816(c, a, b0, b1):
    """mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 for the 4 warps at once.
    c [128, 4] fp32, a [128, 4, 2], b0/b1 [128, 2]. Returns d [128, 4]."""
    a = a.reshape(4, 32, 4, 2)
    b = np.stack([b0, b1], 1).reshape(4, 32, 2, 2)
    c = c.reshape(4, 32, 4)
    for x in (a, b):  # operands are fp16 values
        assert np.array_equal(x[np.isfinite(x)], round_h(x[np.isfinite(x)]))
    A = np.empty((4, 16, 16))
    B = np.empty((4, 16, 8))
    C = np.empty((4, 16, 8))
    A[:, A_ROW, A_COL] = a
    B[:, B_K, B_N] = b
    C[:, C_ROW, C_COL] = c
    Dm = (A @ B + C).astype(F32)
    return Dm[:, C_ROW, C_COL].reshape(NT, 4)


def pack2(lo, hi):
    return np.stack([round_h(lo), round_h(hi)], -1)


def pack_a(c0, c1):
    """A fragment [128, 4, 2] from two C tiles [128, 4] (common.cuh pack_a)."""
    return np.stack([pack2(c0[:, 0], c0[:, 1]), pack2(c0[:, 2], c0[:, 3]),
                     pack2(c1[:, 0], c1[:, 1]), pack2(c1[:, 2], c1[:, 3])], 1)

