"""One base class per op family: its name, the features a call can use, the contract of `impl`,
and the family's own flags. A backend module subclasses these (one class per family it serves)."""
from __future__ import annotations

from typing import Optional

from .registry import Backend


class AttentionBackend(Backend):
    """forkattn.attention. impl: FwdBwd(fwd(q, k, v, key_padding_mask, causal, scale) -> (out, lse),
    bwd(dout, q, k, v, out, lse, key_padding_mask, causal, scale) -> (dq, dk, dv)), called through the
    custom ops forkattn::attention_fwd/_bwd; out and grads in the layout of _layout.empty_bhld, lse
    float32 [B, H, Lq] (+inf on empty rows). With CUSTOM_OP False, impl(q, k, v, key_padding_mask,
    causal, scale, dropout_p, seed) -> out, differentiable as it is.
    "dropout" (a call with dropout_p > 0): fwd and bwd get two more arguments, dropout_p (float in
    (0, 1)) and seed (signed int64), and draw kernels/common/philox.h's mask; without dropout they
    are called with the six (nine) arguments above, so a backend without it needs no change. A
    backend that has no dropout leaves "dropout" out of its FEATURES."""

    OP = "attention"
    FEATURES = frozenset({"causal", "key_padding", "gqa", "dropout"})


class AttentionVarlenBackend(Backend):
    """forkattn.attention_varlen (packed sequences, FlashAttention's varlen convention). impl:
    FwdBwd(fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [total_q, H, D], lse float32
    [H, total_q]), bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)),
    contiguous. With CUSTOM_OP False, impl(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
    seed) -> out. "dropout": as for AttentionBackend (fwd and bwd get dropout_p and seed last)."""

    OP = "attention_varlen"
    FEATURES = frozenset({"causal", "gqa", "dropout"})


class DecodeBackend(Backend):
    """forkattn.decode_attention. impl(q, k_cache, v_cache, seqlens, block_table, o_partial,
    lse_partial, max_seqlen, num_splits, scale) -> out [B, H, T, D] ([B, T, H, D] memory), called
    through the custom op forkattn::decode_attention (or directly, see _custom_op.direct_call_ok)."""

    OP = "decode_attention"
    FEATURES = frozenset({"paged", "gqa"})
    SPLITS_KV = False  # splits the KV sequence into num_splits chunks (needs the plan's workspace)
    CHECKS_CACHE = False  # its entry point validates seqlens and block_table itself (no host sync to save)
    HOST_LENGTH_BOUND = False  # reads one padded slice as long as max_seqlen: pass the host bound on lengths

    def rows_per_program(self) -> Optional[int]:
        """Query rows (GQA heads x new tokens) one program of a split-KV kernel takes."""
        return None


class KVAppendBackend(Backend):
    """KVCache.append. impl(k_cache, v_cache, seqlens, block_table, k, v, max_seqlen) -> None, in
    place, called through the custom op forkattn::kv_append (or directly)."""

    OP = "kv_append"
    FEATURES = frozenset({"paged"})


class MLMBackend(Backend):
    """forkattn.mlm_mask. impl(input_ids, out, out_labels, special_tokens_mask, attention_mask, labels,
    word_ids, special_ids, excluded_ids, vocab_size, mask_token_id, seed, t_select, t_mask, t_random,
    n_random, exact, min_masked) writes out and out_labels; called through the custom ops
    forkattn::mlm_mask / mlm_mask_ (or directly). With CUSTOM_OP False, impl takes mlm_mask's
    checked keyword arguments (see backends/eager.py) and returns (masked, labels)."""

    OP = "mlm_mask"
    FEATURES = frozenset({"exact", "word_ids", "min_masked"})
    FEATURE_TEXT = {"exact": "mode='exact'", "word_ids": "word_ids (whole-word masking)"}


class DisentangledAttentionBackend(Backend):
    """forkattn.disentangled_attention (DeBERTa). impl: FwdBwd(fwd, bwd), called through the custom
    ops forkattn::disentangled_attention_fwd / _bwd:
    fwd(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c) -> (out, lse);
    bwd(dout, q, k, v, pos_key, pos_query, out, lse, rel_index, key_padding_mask, scale, c2p, p2c)
    -> (dq, dk, dv, dpos_key, dpos_query).
    q [B, H, Lq, D], k, v [B, H, Lk, D] with unit stride in D; pos_key / pos_query [H, 2 * span, D]
    (a head stride of 0 when shared by the heads), None when c2p / p2c is off; rel_index int64
    [Lq + Lk - 1] on q's device, entry (i - j) + Lk - 1 the embedding row δ(i, j) of query i and key
    j (the op builds it); key_padding_mask bool [B, Lk] or None. out, dq, dk, dv in the layout of
    _layout.empty_bhld, lse float32 [B, H, Lq] (+inf on empty rows), dpos_* contiguous
    [H, 2 * span, D] (empty, numel 0, for a term that is off). With CUSTOM_OP False,
    impl(q, k, v, pos_key, pos_query, rel_index, key_padding_mask, scale, c2p, p2c) -> out,
    differentiable as it is (pos_key / pos_query may then have 1 head).
    "dropout" (a call with dropout_p > 0), AttentionBackend's convention: fwd and bwd (and a
    CUSTOM_OP False impl) get two more arguments last, dropout_p (float in (0, 1)) and seed (signed
    int64), and drop the probabilities with kernels/common/philox.h's mask of (b, h, i, j), the
    one forkattn.attention draws for that seed and shape (kept iff u16 >= dropout_threshold16(p),
    survivors scaled by 1 / (1 - p)); lse stays the undropped softmax's, and the backward redraws
    the mask from the seed. Without dropout they are called with the arguments above, so a
    backend without it needs no change. Unlike the other families, "dropout" is not in FEATURES
    here: a backend that has it adds it, and the registry never gives a dropout call to one that
    has not (backend=None skips it, a named one raises)."""

    OP = "disentangled_attention"
    FEATURES = frozenset({"key_padding", "c2p", "p2c"})
    FEATURE_TEXT = {"dropout": "dropout (dropout_p > 0)"}
