"""forkattn.disentangled_attention: DeBERTa-v2/v3's attention with relative-position terms.

The "disentangled_attention" op family. Its backends (forkattn/backends/) implement the contract of
backends.families.DisentangledAttentionBackend: "eager" (forkattn.reference, plain PyTorch,
materialising the scores) is called as it is; a kernel backend is called through the custom ops
forkattn::disentangled_attention_fwd / _bwd defined here, so autograd, torch.compile and opcheck
see one op whatever the backend. The relative-position table (which embedding row query i and key
j read) is built here, once per shape, on the host, and handed to every backend: the backends
never recompute the log buckets, so they agree with each other and with transformers bit for bit.
"""
from __future__ import annotations

import functools
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends, reference
from ._checks import check_dropout, key_padding_mask_as_bool, resolve_scale
from ._custom_op import assume_constant_result
from ._layout import empty_bhld, stride1
from .attention import _check_qkv

BACKENDS = backends.get("disentangled_attention")
_FEATURES = backends.registry.feature_table("key_padding", "c2p", "p2c", "dropout")


# --- argument checks --------------------------------------------------------------------------------

def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_positions(max_relative_positions, position_buckets) -> Tuple[int, int, int]:
    """(max_relative_positions, position_buckets, span) after checking them; ValueError naming the
    argument for values DeBERTa's bucketing cannot use."""
    max_rel = _int("max_relative_positions", max_relative_positions)
    buckets = _int("position_buckets", position_buckets)
    if max_rel < 1:
        raise ValueError(f"max_relative_positions must be at least 1 (a model config's -1 means "
                         f"max_position_embeddings: resolve it first), got {max_rel}")
    if buckets > 0:
        if buckets < 2:
            raise ValueError(f"position_buckets must be <= 0 (no bucketing) or at least 2, got {buckets}")
        if max_rel - 1 <= buckets // 2:
            raise ValueError(f"with position_buckets={buckets}, max_relative_positions must exceed "
                             f"position_buckets // 2 + 1 = {buckets // 2 + 1} (the log buckets divide by "
                             f"log((max_relative_positions - 1) / (position_buckets // 2))), got {max_rel}")
    return max_rel, buckets, reference.relative_span(buckets, max_rel)


def _check_pos(name: str, pos, used: bool, flag: str, q: Tensor, span: int) -> None:
    if not used:
        if pos is not None:
            raise ValueError(f"{name} must be None when {flag}=False (its term is off)")
        return
    if not isinstance(pos, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [heads or 1, 2 * span, head_dim] when {flag}=True, "
                        f"got {type(pos).__name__}")
    H, D = q.shape[1], q.shape[3]
    if pos.dim() != 3 or pos.shape[0] not in (1, H) or pos.shape[2] != D:
        raise ValueError(f"{name} must be [heads or 1, 2 * span, head_dim] = [{H} or 1, {2 * span}, {D}], "
                         f"got shape {tuple(pos.shape)}")
    if pos.shape[1] != 2 * span:
        raise ValueError(f"{name} must have 2 * span = {2 * span} rows (span = position_buckets if > 0, else "
                         f"max_relative_positions), got {pos.shape[1]}")
    if pos.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {pos.dtype}")
    if pos.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {pos.device}")


def check_inputs(q, k, v, pos_key, pos_query, max_relative_positions, position_buckets, key_padding_mask,
                 scale, c2p, p2c):
    """Raises on bad arguments; returns (key_padding_mask as bool or None, scale, max_rel, buckets)."""
    _check_qkv(q, k, v, 4, "[batch, heads, seq, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must have q's batch, heads and head_dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[3] == 0:
        raise ValueError("head_dim must be at least 1, got 0")
    for name, flag in (("c2p", c2p), ("p2c", p2c)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    max_rel, buckets, span = check_positions(max_relative_positions, position_buckets)
    _check_pos("pos_key", pos_key, c2p, "c2p", q, span)
    _check_pos("pos_query", pos_query, p2c, "p2c", q, span)
    mask = key_padding_mask_as_bool(key_padding_mask, q.shape[0], k.shape[2], q.device)
    scale = resolve_scale(scale, q.shape[3] * (1 + int(c2p) + int(p2c)))
    return mask, scale, max_rel, buckets


@functools.lru_cache(maxsize=64)
def _index_table(len_q: int, len_k: int, max_rel: int, buckets: int, device: torch.device) -> Tensor:
    return reference.relative_position_index(len_q, len_k, max_relative_positions=max_rel,
                                             position_buckets=buckets, device=device)


@assume_constant_result
def _index_values(len_q: int, len_k: int, max_rel: int, buckets: int) -> tuple:
    """The table as Python ints: under torch.compile a constant of the graph, so the float32 log
    buckets are evaluated once by eager PyTorch (as transformers does), never re-derived by a
    compiled kernel that might round an edge the other way."""
    return tuple(_index_table(len_q, len_k, max_rel, buckets, torch.device("cpu")).tolist())



def relative_position_index(len_q: int, len_k: int, *, max_relative_positions: int, position_buckets: int = -1,
                            device=None) -> Tensor:
    """int64 [len_q + len_k - 1], entry (i - j) + len_k - 1 = δ(i, j) (see disentangled_attention);
    cached per (lengths, parameters, device). Do not modify it in place."""
    max_rel, buckets, _ = check_positions(max_relative_positions, position_buckets)
    return _index_table(len_q, len_k, max_rel, buckets, torch.device(device or "cpu"))


# --- the custom ops (kernel backends) --------------------------------------------------------------

@torch.library.custom_op("forkattn::disentangled_attention_fwd", mutates_args=())
def disentangled_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor], rel_index: Tensor,
    key_padding_mask: Optional[Tensor], scale: float, c2p: bool, p2c: bool, backend: str, dropout_p: float = 0.0,
    seed: int = 0
) -> Tuple[Tensor, Tensor]:
    """(out in the layout of empty_bhld, lse float32 [B, H, Lq], +inf on empty rows; the undropped
    softmax's). dropout_p > 0: the probabilities are dropped with the Philox mask of `seed` (as
    forkattn::attention_fwd's), and only then are dropout_p and seed passed on to the backend."""
    drop = (dropout_p, seed) if dropout_p else ()
    return BACKENDS.impl(backend).fwd(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c,
                                      *drop)


@disentangled_attention_fwd.register_fake
def _(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c, backend, dropout_p=0.0, seed=0):
    B, H, Lq, D = q.shape
    return empty_bhld(q, B, H, Lq, D), q.new_empty((B, H, Lq), dtype=torch.float32)


@torch.library.custom_op("forkattn::disentangled_attention_bwd", mutates_args=())
def disentangled_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, pos_key: Optional[Tensor], pos_query: Optional[Tensor],
    out: Tensor, lse: Tensor, rel_index: Tensor, key_padding_mask: Optional[Tensor], scale: float, c2p: bool,
    p2c: bool, backend: str, dropout_p: float = 0.0, seed: int = 0, want_dpos_key: bool = True,
    want_dpos_query: bool = True
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv in the layout of empty_bhld, dpos_key, dpos_query contiguous, shaped like pos_key /
    pos_query; an empty tensor for a term that is off or whose gradient is not wanted (want_dpos_*
    False): a custom op returns no None). With dropout, of the forward's mask (regenerated from seed).
    The cpu backend skips the products of an unwanted dpos (2 of the backward's ~11 L^2 D units)."""
    drop = (dropout_p, seed) if dropout_p else ()
    want = dict(want_dpos_key=want_dpos_key, want_dpos_query=want_dpos_query) if backend == "cpu" else {}
    dq, dk, dv, dpk, dpq = BACKENDS.impl(backend).bwd(stride1(dout), q, k, v, pos_key, pos_query, out, lse,
                                                      rel_index, key_padding_mask, scale, c2p, p2c, *drop, **want)
    return dq, dk, dv, dpk if want_dpos_key else q.new_empty(0), dpq if want_dpos_query else q.new_empty(0)


@disentangled_attention_bwd.register_fake
def _(dout, q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask, scale, c2p, p2c, backend,
      dropout_p=0.0, seed=0, want_dpos_key=True, want_dpos_query=True):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dpk, dpq = (q.new_empty(0) if p is None or not want else torch.empty_like(p, memory_format=torch.contiguous_format)
                for p, want in ((pos_key, want_dpos_key), (pos_query, want_dpos_query)))
    return empty_bhld(q, B, H, Lq, D), empty_bhld(k, B, H, Lk, D), empty_bhld(v, B, H, Lk, D), dpk, dpq


def _setup_context(ctx, inputs, output):
    q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c, backend, *dropout = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask)
    ctx.args = (scale, c2p, p2c, backend, *dropout)  # (dropout_p, seed) when given: the backward redraws the mask
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask = ctx.saved_tensors
    scale, c2p, p2c, backend, *dropout = ctx.args
    dropout = dropout or [0.0, 0]
    dq, dk, dv, dpk, dpq = disentangled_attention_bwd(dout, q, k, v, pos_key, pos_query, out, lse, rel_index,
                                                      key_padding_mask, scale, c2p, p2c, backend, *dropout,
                                                      want_dpos_key=ctx.needs_input_grad[3],
                                                      want_dpos_query=ctx.needs_input_grad[4])
    dpk, dpq = (g if p is not None and want else None
                for p, g, want in ((pos_key, dpk, ctx.needs_input_grad[3]), (pos_query, dpq, ctx.needs_input_grad[4])))
    return (dq, dk, dv, dpk, dpq) + (None,) * (len(ctx.args) + 2)


disentangled_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- public API ---------------------------------------------------------------------------------------

def disentangled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos_key: Optional[Tensor],
    pos_query: Optional[Tensor],
    *,
    max_relative_positions: int,
    position_buckets: int = -1,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    c2p: bool = True,
    p2c: bool = True,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """DeBERTa's disentangled attention (transformers' DisentangledSelfAttention).

    q [B, H, Lq, D], k and v [B, H, Lk, D] (forkattn.attention's SDPA layout, any strides; no GQA).
    pos_key, pos_query: the relative embeddings projected per head, [H or 1, 2 * span, D] in q's
    dtype (transformers: pos_key_proj(rel_embeddings) and pos_query_proj(rel_embeddings) -- or
    key_proj / query_proj with share_att_key -- split into heads); None when their term is off.
    span = position_buckets if position_buckets > 0, else max_relative_positions (transformers'
    pos_ebd_size). With r = i - j, or, when position_buckets > 0, DeBERTa's log bucket of it
    (|i - j| < position_buckets // 2 = mid stays; beyond, sign(i - j) * (mid + ceil(log(|i - j| / mid)
    / log((max_relative_positions - 1) / mid) * (mid - 1))), evaluated in float32 as transformers
    does), the row read for query i and key j is

        δ(i, j) = clamp(r + span, 0, 2 * span - 1)

    and the scores and output are

        s[b, h, i, j] = scale * ( q_i · k_j
                                + [c2p] q_i · pos_key[h, δ(i, j)]      (content -> position)
                                + [p2c] k_j · pos_query[h, δ(i, j)] )  (position -> content)
        out[b, h, i]  = Σ_j softmax_j(s[b, h, i, :] over keys with key_padding_mask[b, j]) v_j

    transformers writes p2c as k_j · pos_query[clamp(span - r(j - i))]: r is odd, so it is the same
    row. scale defaults to 1 / sqrt(D * (1 + c2p + p2c)): DeBERTa divides every term by the square
    root of head_dim times the number of enabled terms. c2p=p2c=False is plain attention.
    key_padding_mask: bool [B, Lk], True = attend (or an integer 0/1 mask). A query row that sees no
    key returns zeros and gets zero gradients (transformers instead spreads it uniformly over all
    keys, padded ones included, through masked_fill(finfo.min)). Padded keys may hold anything, NaN
    and inf included, in k and v: they never reach an output or a gradient. Padded query rows are
    computed like the others (only their own outputs see them). Every row of pos_key / pos_query
    is read: keep them finite (they are weights).
    Gradients flow into q, k, v, pos_key and pos_query.
    max_relative_positions >= 1 (a config's -1, "use max_position_embeddings", is the caller's to
    resolve); position_buckets <= 0 turns bucketing off, else it needs position_buckets >= 2 and
    max_relative_positions > position_buckets // 2 + 1.
    dropout_p, seed, generator: attention dropout exactly as forkattn.attention's (transformers'
    attention_probs_dropout_prob): each probability is zeroed with probability dropout_p and the
    survivors scaled by 1 / (1 - dropout_p), after the softmax, before P @ V; the mask element of
    (b, h, i, j) is kernels/common/philox.h's, the one forkattn.attention draws for that seed and
    shape; seed None draws a fresh one per call from `generator` (default: torch's default CPU
    generator). dropout_p = 0 (the default) runs no dropout code. backend=None picks only backends
    that have dropout (the "dropout" feature); a named one without it raises.
    backend: None picks the fastest backend that can run the call; "eager" (plain PyTorch,
    materialising the [B, H, Lq, Lk] scores) runs everywhere. Returns [B, H, Lq, D].
    """
    mask, scale, max_rel, buckets = check_inputs(q, k, v, pos_key, pos_query, max_relative_positions,
                                                 position_buckets, key_padding_mask, scale, c2p, p2c)
    dropout_p, seed = check_dropout(dropout_p, seed, generator)
    b = BACKENDS.resolve(backend, q.device.type, q.dtype, q.shape[-1],
                         _FEATURES[mask is not None, c2p, p2c, dropout_p > 0])
    drop = (dropout_p, seed) if dropout_p else ()  # a backend without dropout is never called with them
    if torch.compiler.is_compiling():
        table = torch.tensor(_index_values(q.shape[2], k.shape[2], max_rel, buckets), dtype=torch.int64,
                             device=q.device)
    else:
        table = _index_table(q.shape[2], k.shape[2], max_rel, buckets, q.device)
    if not b.CUSTOM_OP:  # plain PyTorch: traced as it is under torch.compile, where the cached impl's
        # lock (functools.cached_property on Python 3.11) cannot be entered; building it is cheap
        impl = b.make_impl() if torch.compiler.is_compiling() else b.impl
        return impl(q, k, v, pos_key, pos_query, table, mask, scale, c2p, p2c, *drop)
    H = q.shape[1]
    pos_key = None if pos_key is None else stride1(pos_key.expand(H, -1, -1))
    pos_query = None if pos_query is None else stride1(pos_query.expand(H, -1, -1))
    if mask is not None:
        mask = stride1(mask)
    out, _ = disentangled_attention_fwd(stride1(q), stride1(k), stride1(v), pos_key, pos_query, table, mask, scale,
                                        c2p, p2c, b.NAME, *drop)
    return out
