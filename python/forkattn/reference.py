"""Eager PyTorch references: the "eager" backend of each op and the benchmarks' baseline.

They are written the way a user would write them without forkattn, and are what the tests
compare against (run in float64 for the "true" answer, in the input dtype for the error
budget that a fused kernel is allowed).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import philox


def visible_keys(
    batch: int,
    len_q: int,
    len_k: int,
    *,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    device: torch.device,
) -> Optional[Tensor]:
    """Bool [B or 1, 1, Lq, Lk]: True where query i may attend to key j, or None when all may.

    causal aligns bottom-right: query i sees keys j <= i + (Lk - Lq), so the last query sees
    every key (the KV-cache convention when Lq < Lk).
    """
    allowed = None
    if causal:
        i = torch.arange(len_q, device=device)[:, None]
        j = torch.arange(len_k, device=device)[None, :]
        allowed = (j <= i + (len_k - len_q))[None, None]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)
        allowed = kp if allowed is None else (allowed & kp)
    return allowed


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    _batch_index: Optional[int] = None,
) -> Tensor:
    """matmul -> masked_fill(-inf) -> softmax in fp32 -> dropout -> matmul, with SDPA's [B, H, L, D]
    layout.

    k and v may have fewer heads than q (GQA). Rows with no visible key give zeros, and their
    gradients are zero rather than NaN. dropout_p > 0: the probabilities are multiplied by
    philox.dropout_keep(seed, ...) / (1 - dropout_p) (the mask every backend draws for this seed;
    seed None: one drawn from torch's default generator).
    """
    B, Lq = q.shape[0], q.shape[2]
    allowed = visible_keys(B, Lq, k.shape[2], causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    keep = None
    if dropout_p:
        if seed is None:
            seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
        keep = philox.dropout_keep(seed, dropout_p, B, q.shape[1], Lq, k.shape[2], batch_index=_batch_index,
                                   device=q.device)
    return _attend(q, k, v, allowed, scale, keep=keep, dropout_p=dropout_p)


def attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> Tensor:
    """attention() once per packed sequence (FlashAttention's varlen layout: q [total_q, H, D], k and
    v [total_k, Hkv, D], sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]). Reads cu_seqlens on
    the host. A sequence without keys gives zeros. Returns [total_q, H, D]. Dropout as in
    attention(), sequence b's mask drawn as batch row b (i and j counted inside the sequence)."""
    bounds_q, bounds_k = (_seq_bounds(cu) for cu in (cu_seqlens_q, cu_seqlens_k))
    if dropout_p and seed is None:
        seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
    outs = []
    for b, ((qs, qe), (ks, ke)) in enumerate(zip(bounds_q, bounds_k)):
        o = attention(_bhld(q[qs:qe]), _bhld(k[ks:ke]), _bhld(v[ks:ke]), causal=causal, scale=scale,
                      dropout_p=dropout_p, seed=seed, _batch_index=b)
        if ke == ks:  # no key: the softmax over nothing would be NaN; zeros by contract
            o = o * 0
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty(q.shape)


def _seq_bounds(cu: Tensor):
    c = cu.tolist()
    return list(zip(c[:-1], c[1:]))


def _bhld(t: Tensor) -> Tensor:
    """[L, H, D] rows of one sequence -> a [1, H, L, D] view."""
    return t.unsqueeze(0).transpose(1, 2)


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], scale: Optional[float],
            bias=None, keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """The eager computation shared by attention, decode_attention and disentangled_attention: GQA
    heads expanded, scores in fp32, keys not `allowed` (bool, broadcast to [B, H, Lq, Lk]; None =
    all) masked, rows with no allowed key zero. bias(q, k), when given, returns the scores (float32,
    float64 for float64 inputs) added to q·kᵀ before scaling, from the k whose unseen keys are
    already zeroed. Then dropout:
    P * keep / (1 - dropout_p) when keep (bool [B, H, Lq, Lk]) is given."""
    H, D, Hkv = q.shape[1], q.shape[-1], k.shape[1]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    scale = D ** -0.5 if scale is None else scale
    if allowed is not None:
        # A key no query may see (padding, or past a cache's length) can hold anything, NaN and
        # inf included: zero it, or 0 * inf = NaN in P V (and in the gradients) would reach every
        # row. masked_fill also gives those rows exactly zero gradients.
        unseen = ~allowed.any(dim=-2).unsqueeze(-1)  # [B or 1, 1, Lk, 1]
        k = k.masked_fill(unseen, 0)
        v = v.masked_fill(unseen, 0)
    s = torch.matmul(q, k.transpose(-2, -1))
    if bias is not None:  # float32, or float64 for a float64 reference (never rounded to float32)
        s = (s.to(_score_dtype(s.dtype)) + bias(q, k)) * scale
    else:
        s = s * scale
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
        row_any = allowed.any(dim=-1, keepdim=True)
        s = s.masked_fill(~row_any, 0.0)  # keeps softmax finite on empty rows ...
    p = torch.softmax(s, dim=-1)
    if allowed is not None:
        p = p.masked_fill(~row_any, 0.0)  # ... which then contribute nothing
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    return torch.matmul(p.to(v.dtype), v)


def _score_dtype(dtype):
    """What scores are summed in: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mlm_mask(
    input_ids: Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    mask_prob: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    special_token_ids: Optional[list] = None,
    special_tokens_mask: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    excluded_ids: Optional[list] = None,
    generator: Optional[torch.Generator] = None,
):
    """BERT's 80/10/10 masking the way transformers' DataCollatorForLanguageModeling writes it:
    clone, three torch.bernoulli draws over full-size probability tensors, torch.randint and
    boolean-index writes. Returns (masked_input_ids, labels) with -100 at unselected positions.

    excluded_ids: ids a random replacement never produces (drawn uniformly from the others).
    """
    inputs = input_ids.clone()
    out_labels = input_ids.clone()
    shape, dev = input_ids.shape, input_ids.device
    probability_matrix = torch.full(shape, mask_prob, device=dev)
    ineligible = torch.zeros(shape, dtype=torch.bool, device=dev)
    if special_tokens_mask is not None:
        ineligible |= special_tokens_mask.bool()
    if special_token_ids:
        ineligible |= torch.isin(input_ids, torch.tensor(special_token_ids, device=dev, dtype=input_ids.dtype))
    if attention_mask is not None:
        ineligible |= attention_mask == 0
    if labels is not None:
        ineligible |= labels == -100
    probability_matrix.masked_fill_(ineligible, 0.0)
    masked_indices = torch.bernoulli(probability_matrix, generator=generator).bool()
    out_labels[~masked_indices] = -100

    replaced = torch.bernoulli(torch.full(shape, mask_replace_prob, device=dev), generator=generator).bool()
    replaced &= masked_indices
    inputs[replaced] = mask_token_id

    rest = 1.0 - mask_replace_prob
    p_random = 0.0 if rest <= 0 else min(1.0, random_replace_prob / rest)
    random_idx = torch.bernoulli(torch.full(shape, p_random, device=dev), generator=generator).bool()
    random_idx &= masked_indices & ~replaced
    if excluded_ids:
        allowed = torch.ones(vocab_size, dtype=torch.bool, device=dev)
        allowed[torch.tensor(excluded_ids, device=dev)] = False
        table = allowed.nonzero().squeeze(1).to(input_ids.dtype)
        random_words = table[torch.randint(len(table), shape, device=dev, generator=generator)]
    else:
        random_words = torch.randint(vocab_size, shape, dtype=input_ids.dtype, device=dev, generator=generator)
    inputs[random_idx] = random_words[random_idx]
    return inputs, out_labels


# --- KV-cache decoding ------------------------------------------------------------------------------

def kv_append(
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    block_table: Optional[Tensor],
    k: Tensor,
    v: Tensor,
    max_seqlen: int,
) -> None:
    """Eager KVCache append with index_put: token t of sequence b goes to position seqlens[b] + t
    (page block_table[b, pos // P], slot pos % P; page b, slot pos when block_table is None).
    Tokens that do not fit (position >= max_seqlen, or no page: an entry < 0 or >= the pool's
    num_pages) and every later token of that sequence are dropped, as is every token of a sequence
    with a negative length; seqlens advances by the tokens written. Uses a data-dependent index
    (syncs with the host), unlike the kernels."""
    B, Hkv, T, D = k.shape
    P = k_cache.shape[2]
    dev = k_cache.device
    pos = seqlens.to(torch.int64)[:, None] + torch.arange(T, device=dev)[None, :]
    if block_table is None:
        page = torch.arange(B, device=dev)[:, None].expand(B, T)
        ok = pos < max_seqlen
    else:
        logical = pos // P
        in_table = (logical >= 0) & (logical < block_table.shape[1])
        page = block_table.to(torch.int64).gather(1, logical.clamp(min=0, max=block_table.shape[1] - 1))
        ok = in_table & (pos < max_seqlen) & (page >= 0) & (page < k_cache.shape[0])
    ok = ok & (seqlens[:, None] >= 0)
    ok = ok.to(torch.int32).cumprod(dim=1).bool()  # stop at the first token that does not fit
    bi, ti = ok.nonzero(as_tuple=True)
    slot = pos % P
    k_cache[page[bi, ti], :, slot[bi, ti]] = k[bi, :, ti]
    v_cache[page[bi, ti], :, slot[bi, ti]] = v[bi, :, ti]
    seqlens.add_(ok.sum(dim=1).to(seqlens.dtype))


def gather_kv(cache_t: Tensor, block_table: Optional[Tensor], kv_len: int) -> Tensor:
    """[B, Hkv, kv_len, D] view/copy of a contiguous or paged cache tensor. A position whose page
    entry is missing (< 0) or outside the pool (>= num_pages) reads page 0 instead, never out of
    bounds; page_valid tells which positions those are."""
    if block_table is None:
        return cache_t[:, :, :kv_len]
    P = cache_t.shape[2]
    n = -(-kv_len // P)
    pages = block_table[:, :n].to(torch.int64)
    pages = torch.where(pages < cache_t.shape[0], pages, 0).clamp(min=0)
    g = cache_t[pages]  # [B, n, Hkv, P, D]
    B, _, Hkv, _, D = g.shape
    return g.permute(0, 2, 1, 3, 4).reshape(B, Hkv, n * P, D)[:, :, :kv_len]


def page_valid(block_table: Optional[Tensor], num_pages: int, page_size: int, kv_len: int) -> Optional[Tensor]:
    """Bool [B, kv_len]: position j of sequence b lies on a page of the pool (None: contiguous, all do)."""
    if block_table is None:
        return None
    n = -(-kv_len // page_size)
    pages = block_table[:, :n]
    ok = (pages >= 0) & (pages < num_pages)
    return ok.repeat_interleave(page_size, dim=1)[:, :kv_len]


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens: Tensor,
    block_table: Optional[Tensor],
    kv_len: int,
    *,
    scale: Optional[float] = None,
) -> Tensor:
    """Eager decode attention: gather the cache slice [B, Hkv, kv_len, D] (kv_len >= every length),
    then matmul -> mask (query t of sequence b sees keys j <= seqlens[b] - T + t) -> softmax in
    fp32 -> matmul. Returns [B, H, T, D] with [B, T, H, D] memory, like the kernels."""
    T = q.shape[2]
    k = gather_kv(k_cache, block_table, kv_len)
    v = gather_kv(v_cache, block_table, kv_len)
    L = seqlens.to(torch.int64).clamp(min=0, max=kv_len)
    t = torch.arange(T, device=q.device)
    j = torch.arange(kv_len, device=q.device)
    stored = j[None, :] < L[:, None]  # [B, kv_len]: the sequence's tokens ...
    valid = page_valid(block_table, k_cache.shape[0], k_cache.shape[2], kv_len)
    if valid is not None:
        stored = stored & valid  # ... on pages of the pool (the kernels skip the others)
    allowed = stored[:, None, None, :] & (j[None, None, :] <= (L[:, None, None] - T + t[None, :, None]))[:, None]
    # masked scores drop whatever an unused slot's key holds; its value (NaN, inf) would still reach
    # the output through 0 * NaN in P @ V
    v = v.masked_fill(~stored[:, None, :, None], 0)
    out = _attend(q, k, v, allowed, scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


# --- disentangled attention (DeBERTa-v2/v3) -----------------------------------------------------------

def relative_span(position_buckets: int, max_relative_positions: int) -> int:
    """DeBERTa's attention span: position_buckets when bucketing (> 0), else max_relative_positions;
    the relative embeddings (pos_key, pos_query) have 2 * span rows."""
    return position_buckets if position_buckets > 0 else max_relative_positions


def log_bucket_position(rel: Tensor, position_buckets: int, max_relative_positions: int) -> Tensor:
    """DeBERTa-v2's make_log_bucket_position, in float32 as transformers evaluates it (the ceil at a
    bucket edge depends on it): |r| < position_buckets // 2 (= mid) stays r; beyond, sign(r) * (mid +
    ceil(log(|r| / mid) / log((max_relative_positions - 1) / mid) * (mid - 1))). rel int64; returns int64."""
    mid = position_buckets // 2
    near = (rel < mid) & (rel > -mid)
    abs_pos = torch.where(near, torch.full_like(rel, mid - 1), rel.abs()).to(torch.float32)
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_relative_positions - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.to(torch.float32), log_pos * torch.sign(rel)).to(torch.int64)


def relative_position_index(len_q: int, len_k: int, *, max_relative_positions: int, position_buckets: int = -1,
                            device=None) -> Tensor:
    """int64 [len_q + len_k - 1]: entry (i - j) + (len_k - 1) is δ(i, j) = clamp(r(i - j) + span, 0,
    2 * span - 1), the row of pos_key / pos_query that query i and key j read; r is the identity, or
    log_bucket_position when position_buckets > 0. Computed on the host (one table for all backends)."""
    span = relative_span(position_buckets, max_relative_positions)
    rel = torch.arange(max(len_q + len_k - 1, 0), dtype=torch.int64) - (len_k - 1)  # i - j, ascending
    if position_buckets > 0:
        rel = log_bucket_position(rel, position_buckets, max_relative_positions)
    return (rel + span).clamp(0, 2 * span - 1).to(device)


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
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """forkattn.disentangled_attention in plain PyTorch, materialising the [B, H, Lq, Lk] scores and
    the c2p / p2c products against every relative embedding (the definition is in
    forkattn.disentangled_attention's docstring). Differentiable by autograd in all five inputs.
    dropout_p > 0: the probabilities are multiplied by keep / (1 - dropout_p), keep = dropout_mask
    (bool, broadcast to [B, H, Lq, Lk]) when given, else philox.dropout_keep(seed, ...), the mask
    every backend draws for this seed (seed None: one drawn from torch's default generator)."""
    table = relative_position_index(q.shape[2], k.shape[2], max_relative_positions=max_relative_positions,
                                    position_buckets=position_buckets, device=q.device)
    if scale is None:
        scale = (q.shape[-1] * (1 + int(c2p) + int(p2c))) ** -0.5
    return disentangled_attention_indexed(q, k, v, pos_key, pos_query, table, key_padding_mask, scale, c2p, p2c,
                                          dropout_p, seed, dropout_mask)


def disentangled_attention_indexed(q, k, v, pos_key, pos_query, rel_index: Tensor, key_padding_mask, scale: float,
                                   c2p: bool, p2c: bool, dropout_p: float = 0.0, seed: Optional[int] = None,
                                   dropout_mask: Optional[Tensor] = None) -> Tensor:
    """The eager backend's body: rel_index from relative_position_index; pos_key / pos_query
    [H or 1, 2 * span, D] (None when their term is off); dropout as disentangled_attention's."""
    Lq, Lk = q.shape[2], k.shape[2]
    i = torch.arange(Lq, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    delta = rel_index[i - j + (Lk - 1)]  # [Lq, Lk]
    acc = _score_dtype(q.dtype)

    def bias(q, k):
        s = 0.0
        if c2p:  # q_i · pos_key[δ(i, j)]: every product q_i · pos_key[r], then the gather
            c = torch.matmul(q, pos_key.unsqueeze(0).transpose(-2, -1)).to(acc)  # [B, H, Lq, 2 span]
            s = s + c.gather(-1, delta.expand(*c.shape[:2], Lq, Lk))
        if p2c:  # k_j · pos_query[δ(i, j)]: every product k_j · pos_query[r], gathered per (j, i)
            p = torch.matmul(k, pos_query.unsqueeze(0).transpose(-2, -1)).to(acc)  # [B, H, Lk, 2 span]
            s = s + p.gather(-1, delta.t().expand(*p.shape[:2], Lk, Lq)).transpose(-2, -1)
        return s

    allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :].to(torch.bool)
    keep = None
    if dropout_p:
        keep = dropout_mask
        if keep is None:
            if seed is None:
                seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64))
            keep = philox.dropout_keep(seed, dropout_p, q.shape[0], q.shape[1], Lq, Lk, device=q.device)
    return _attend(q, k, v, allowed, scale, bias=bias if (c2p or p2c) else None, keep=keep, dropout_p=dropout_p)
