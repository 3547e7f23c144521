"""Triton fused disentangled attention (DeBERTa): the "triton" backend of forkattn.disentangled_attention.

The kernels are in disentangled_kernels.py; this module holds their configurations, the launchers
and the two entry points of backends.families.DisentangledAttentionBackend. No [Lq, Lk] matrix and
no [Lq, 2 span] product is ever in memory.

Method. FlashAttention-2 (forkattn/triton/attention.py's online softmax in base 2, fp32 accumulators,
lse stored in natural log, +inf for a row with no visible key, whose output is zeros), with two
more terms in each tile's scores. For a query block of BLOCK_M rows and a key block of BLOCK_N
columns, the relative positions i - j of the tile are BLOCK_M + BLOCK_N - 1 consecutive entries of
the relative-index table, one per diagonal u = i' - j' + BLOCK_N - 1. The kernel loads, per
diagonal, the position row it reads (G[u] = pos_key[rel_index[t0 + u]], an indexed row load from
the small [2 span, D] projection), computes q G^T [BLOCK_M, U] with one tl.dot, and picks entry
(i', u(i', j')) for each (i', j') with tl.gather (a fixed skew: the index tensor does not depend on
the tile); p2c is G' k^T [U, BLOCK_N] gathered along the other axis. Why per diagonal rather than
a window of consecutive table rows: the rows the tile reads are then exactly U rows whatever the
table is (log buckets, clamping at ±span, several diagonals on one row), so one dot and one gather
cover every tile, with no assumption that the table steps by at most one row (transformers' log
buckets can skip rows when max_relative_positions is close to position_buckets // 2), and no
second pass. Cost: the c2p and p2c dots are U = BLOCK_M + BLOCK_N - 1 wide, so with square blocks
the forward does about 3x the tensor-core work of plain attention (q k^T, p v, and 2x2 for the
position terms), still far less memory traffic than the eager path's L x L matrices.

Dropout (dropout_p > 0; a constexpr, so p = 0 compiles without it): forkattn/triton/attention.py's
Philox mask of (b, h, i, j), the one forkattn.attention draws for the seed, on P after the row's
normalizer is summed (lse undropped), redrawn by both backward kernels (disentangled_kernels.py).

Backward: Delta = rowsum(dO * O) from the stored output (forkattn/triton/attention_bwd.py's kernel;
like FlashAttention, so for fp16/bf16 Delta carries the output's rounding), then
  * per query block (_dis_bwd_dq_kernel): dQ = scale (dS k + Z G), where Z[i', u] = dS on row i'
    and diagonal u (a gather of dS); and dpos_key[rel_index[t0 + u]] += scale Σ_i' Z[i', u] q_i';
  * per key block (_dis_bwd_dkdv_kernel): dV = P^T dO, dK = scale (dS^T q + Y^T G'), Y[u, j'] = dS
    on column j' and diagonal u; and dpos_query[rel_index[t0 + u]] += scale Σ_j' Y[u, j'] k_j'.
The position gradients are summed over batches, query blocks and key blocks with fp32 atomic adds
into float32 [H, 2 span, D] accumulators (zeroed by the launcher; with autotuning, reset between
timing runs), then scaled and cast to the input dtype. Several diagonals of one tile may share a
row (clamped or bucketed positions): the atomics add them all. Determinism: on a GPU the order of
the fp32 atomic adds varies from run to run, so dpos_key / dpos_query may differ in the last bits
between runs (dq, dk, dv and the forward are deterministic); the interpreter runs the programs in
order and is deterministic.
"""
from __future__ import annotations

import os

import torch
import triton

from .._layout import empty_bhld
from ..philox import dropout_threshold
from . import interpreting
from .attention import LOG2E, _block_d, _dot_prec, _mask_args, _smem_limit
from .attention_bwd import _attn_bwd_delta_kernel
from .disentangled_kernels import _dis_bwd_dkdv_kernel, _dis_bwd_dq_kernel, _dis_fwd_kernel

MAX_HEAD_DIM = 128  # a tile keeps [U, head_dim] position rows for c2p and p2c


# --- configurations ---------------------------------------------------------------------------------

def _configs(*specs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in specs]


# Square blocks minimise the position terms' work ((BM + BN)^2 / (BM BN) dot units per tile). The
# sets are small (each config is a compile per kernel and key) and chosen by ptxas for sm_90a
# (triton.compile to a GPUTarget, no device; fp16, D64, 2 stages): every config sits at 255
# registers; spill bytes: forward 32x32/4 warps 0, 64x64/8 72, 64x64/4 1824, 64x32/4 964;
# dQ 32x32/4 160, 64x64/8 728, 64x64/4 3876; dK/dV 32x32/4 104, 64x64/8 1096, 32x64/4 2128.
# Not yet timed on a GPU.
_CONFIGS = {
    "fwd": _configs((32, 32, 4, 2), (32, 32, 4, 3), (64, 64, 8, 2), (64, 64, 8, 3)),
    "dq": _configs((32, 32, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2)),
    "dkdv": _configs((32, 32, 4, 2), (32, 32, 8, 2), (64, 64, 8, 2)),
}
# interpreter / FORKATTN_TRITON_AUTOTUNE=0: one config each. Under the interpreter BLOCK_M != BLOCK_N,
# so a skew that mixed up the two would show, and the odd test sizes cross several blocks.
_INTERP = {"fwd": (64, 32, 4, 1), "dq": (64, 32, 4, 1), "dkdv": (32, 64, 4, 1)}
_FIXED = {"fwd": [(64, 64, 8, 2), (32, 32, 4, 2)], "dq": [(32, 32, 4, 2), (32, 32, 4, 1)],
          "dkdv": [(32, 32, 4, 2), (32, 32, 4, 1)]}


def _up(block_m: int, block_n: int) -> int:
    """The diagonals of a tile, padded to a power of two (tl.arange)."""
    return triton.next_power_of_2(block_m + block_n - 1)


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("FORKATTN_TRITON_AUTOTUNE", "1") != "0"


def keep(block_m: int, block_n: int, num_warps: int, num_stages: int, block_d: int, elem: int) -> bool:
    """Whether a config fits, roughly: shared memory for the pipelined k, v and both position-row
    tiles within the device's limit, and the fp32 tiles (scores, the two [.., U] products, the
    accumulator) at most ~192 values per thread. The autotuner picks among what is kept."""
    up = _up(block_m, block_n)
    smem = (block_m * block_d + max(num_stages - 1, 1) * (2 * block_n + 2 * up) * block_d) * elem
    regs = (block_m * block_d + 2 * block_m * block_n + block_m * up + up * block_n) / (32 * num_warps)
    return smem <= _smem_limit() and regs <= 192


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    kept = [c for c in configs if keep(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                                       args["BLOCK_D"], args["Q"].element_size())]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]


_KEYS = ["SEQ_Q_KEY", "SEQ_K_KEY", "C2P", "P2C", "HAS_MASK", "D", "HAS_DROPOUT"]
_PLAIN = {"fwd": _dis_fwd_kernel, "dq": _dis_bwd_dq_kernel, "dkdv": _dis_bwd_dkdv_kernel}
_TUNED = {kind: triton.autotune(_CONFIGS[kind], key=_KEYS, prune_configs_by={"early_config_prune": _prune},
                                reset_to_zero=reset)(
    triton.heuristics({"UP": lambda a: _up(a["BLOCK_M"], a["BLOCK_N"])})(kernel))
          for (kind, kernel), reset in zip(_PLAIN.items(), ([], ["DPK"], ["DPQ"]))}


def _launch(kind, grid_len, H, B, args: dict):
    """Launch `kind` autotuned, or with its fixed config (interpreter, FORKATTN_TRITON_AUTOTUNE=0)."""
    by = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if autotune_enabled():
        _TUNED[kind][lambda meta: (triton.cdiv(grid_len, meta[by]), H, B)](**args)
        return
    if interpreting():
        bm, bn, w, s = _INTERP[kind]
    else:
        fits = [c for c in _FIXED[kind] if keep(*c, args["BLOCK_D"], args["Q"].element_size())]
        bm, bn, w, s = (fits or _FIXED[kind][-1:])[0]
    grid = (triton.cdiv(grid_len, bn if kind == "dkdv" else bm), H, B)
    _PLAIN[kind][grid](**args, BLOCK_M=bm, BLOCK_N=bn, UP=_up(bm, bn), num_warps=w, num_stages=s)


# --- launchers ----------------------------------------------------------------------------------------

def _bhl(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c, dropout_p, seed):
    """The arguments every kernel takes: inputs, strides, masks and compile-time switches."""
    B, H, Lq, D = q.shape
    kpm, klo, khi, smb, smn = _mask_args(q, key_padding_mask)
    pk = pos_key if c2p else q  # an unused pointer argument: any tensor
    pq = pos_query if p2c else q
    sq, sk, sv = _bhl(q), _bhl(k), _bhl(v)
    return dict(
        Q=q, K=k, V=v, PK=pk, PQ=pq, REL=rel_index, KPM=kpm, KLO=klo, KHI=khi,
        stride_qb=sq[0], stride_qh=sq[1], stride_qm=sq[2],
        stride_kb=sk[0], stride_kh=sk[1], stride_kn=sk[2],
        stride_vb=sv[0], stride_vh=sv[1], stride_vn=sv[2],
        stride_pkh=pk.stride(0) if c2p else 0, stride_pkr=pk.stride(1) if c2p else 0,
        stride_pqh=pq.stride(0) if p2c else 0, stride_pqr=pq.stride(1) if p2c else 0,
        stride_mb=smb, stride_mn=smn,
        Lq=Lq, Lk=k.shape[2], qk_scale=scale * LOG2E,
        # dropout (as forkattn/triton/attention.py's): the seed's 64-bit pattern as a non-negative int
        seed=int(seed) & 0xFFFFFFFFFFFFFFFF, H_Q=H, drop_thresh=dropout_threshold(dropout_p) if dropout_p else 0,
        drop_scale=1.0 / (1.0 - dropout_p), HAS_DROPOUT=dropout_p > 0,
        SEQ_Q_KEY=triton.next_power_of_2(max(Lq, 16)), SEQ_K_KEY=triton.next_power_of_2(max(k.shape[2], 16)),
        C2P=bool(c2p), P2C=bool(p2c), HAS_MASK=key_padding_mask is not None,
        D=D, BLOCK_D=_block_d(D),
        UPCAST=interpreting() and q.dtype == torch.bfloat16,  # the 3.6 interpreter's bf16 dot is wrong
        DOT_PREC=_dot_prec(q.dtype),
    )


def _check_rel_index(rel_index, q, k):
    Lq, Lk = q.shape[2], k.shape[2]
    if rel_index.dtype != torch.int64 or rel_index.shape != (Lq + Lk - 1,) or rel_index.device != q.device:
        raise ValueError(f"rel_index must be int64 [Lq + Lk - 1] = [{Lq + Lk - 1}] on {q.device}, got "
                         f"{rel_index.dtype} {tuple(rel_index.shape)} on {rel_index.device}")
    return rel_index.contiguous()


def _staged(t, upcast: bool):
    """Where a kernel writes t: t itself, or (interpreting bf16) a float32 twin copied into t after, by
    torch, rounding to nearest: the 3.6 interpreter's float32 -> bf16 cast truncates (0.99999 -> 0.9961),
    a GPU's rounds to nearest even."""
    return torch.empty_strided(t.shape, t.stride(), dtype=torch.float32, device=t.device) if upcast else t


def disentangled_fwd(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale: float, c2p: bool, p2c: bool,
                     dropout_p: float = 0.0, seed: int = 0):
    """The contract of DisentangledAttentionBackend.fwd -> (out in empty_bhld layout, lse f32 [B, H, Lq]),
    dropout included (lse undropped)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    out = empty_bhld(q, B, H, Lq, D)
    lse = q.new_empty((B, H, Lq), dtype=torch.float32)
    if B * H * Lq == 0:
        return out, lse
    if Lk == 0:  # no key at all: every row is empty
        return out.zero_(), lse.fill_(float("inf"))
    rel_index = _check_rel_index(rel_index, q, k)
    args = _common(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c, dropout_p, seed)
    o = _staged(out, args["UPCAST"])
    so, sl = _bhl(o), _bhl(lse)
    args.update(Out=o, Lse=lse, stride_ob=so[0], stride_oh=so[1], stride_om=so[2],
                stride_lb=sl[0], stride_lh=sl[1], stride_lm=sl[2])
    _launch("fwd", Lq, H, B, args)
    if o is not out:
        out.copy_(o)
    return out, lse


def disentangled_bwd(dout, q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask, scale: float,
                     c2p: bool, p2c: bool, dropout_p: float = 0.0, seed: int = 0):
    """The contract of DisentangledAttentionBackend.bwd -> (dq, dk, dv, dpos_key, dpos_query); with
    dropout, of the forward's mask (redrawn from seed; out is the dropped output)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dq, dk, dv = empty_bhld(q, B, H, Lq, D), empty_bhld(k, B, H, Lk, D), empty_bhld(v, B, H, Lk, D)
    # float32 accumulators of the atomic adds, [H, 2 span, D] contiguous
    dpk = torch.zeros(pos_key.shape, dtype=torch.float32, device=q.device) if c2p else None
    dpq = torch.zeros(pos_query.shape, dtype=torch.float32, device=q.device) if p2c else None

    def finish(g):
        return q.new_empty(0) if g is None else g.mul_(scale).to(q.dtype)

    if B * H * Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), finish(dpk), finish(dpq)
    rel_index = _check_rel_index(rel_index, q, k)
    args = _common(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c, dropout_p, seed)
    delta = torch.empty_like(lse)
    so, sdo, sl = _bhl(out), _bhl(dout), _bhl(lse)
    block_d = args["BLOCK_D"]
    block_m = max(16, min(128, 8192 // block_d))
    _attn_bwd_delta_kernel[(triton.cdiv(Lq, block_m), H, B)](
        out, dout, delta, lse, so[0], so[1], so[2], sdo[0], sdo[1], sdo[2], sl[0], sl[1], sl[2],
        Lq, IS_VARLEN=False, BLOCK_M=block_m, BLOCK_D=block_d, D=D)
    # strides of the accumulators (alike); a term that is off gets its own scratch word, never a
    # tensor the kernel reads (autotuning zeroes DPK / DPQ between timing runs)
    scratch = lse.new_zeros(1)
    dpk_arg, dpq_arg = (dpk if c2p else scratch), (dpq if p2c else scratch)
    acc = dpk if c2p else (dpq if p2c else lse)
    args.update(DO=dout, Lse=lse, Delta=delta, sm_scale=scale,
                stride_dob=sdo[0], stride_doh=sdo[1], stride_dom=sdo[2],
                stride_lb=sl[0], stride_lh=sl[1], stride_lm=sl[2],
                stride_gh=acc.stride(0), stride_gr=acc.stride(1))
    gq, gk, gv = (_staged(t, args["UPCAST"]) for t in (dq, dk, dv))
    sdq, sdk, sdv = _bhl(gq), _bhl(gk), _bhl(gv)
    _launch("dq", Lq, H, B, dict(args, DQ=gq, DPK=dpk_arg,
                                 stride_dqb=sdq[0], stride_dqh=sdq[1], stride_dqm=sdq[2]))
    _launch("dkdv", Lk, H, B, dict(args, DK=gk, DV=gv, DPQ=dpq_arg,
                                   stride_dkb=sdk[0], stride_dkh=sdk[1], stride_dkn=sdk[2],
                                   stride_dvb=sdv[0], stride_dvh=sdv[1], stride_dvn=sdv[2]))
    for t, g in ((dq, gq), (dk, gk), (dv, gv)):
        if g is not t:
            t.copy_(g)
    return dq, dk, dv, finish(dpk), finish(dpq)
