"""A bad-input matrix (issue 12, "make it stay fixed"): every public entry point x wrong rank / shape /
dtype / device / value, each expecting a clean Python exception of the right type (ValueError for a
shape or value, TypeError for a dtype or type) whose message names the argument; a few "accept"
cases check that valid spellings are not refused.

Each entry point's cases run in one subprocess (`python tests/test_bad_inputs.py ENTRY`), which
prints a START line before each case and a JSON line after it, so a crash (segfault, abort) or a
hang fails that entry's test naming the case that was running, instead of killing the test run.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCEPT = None  # expected "exception" of a case that must return normally


def _case(name, fn, exc, *needles):
    return (name, fn, exc, needles)


# --- the cases, per entry point (built lazily: only the subprocess imports torch/forkattn) -------------

def attention_cases():
    import numpy as np
    import torch

    import forkattn

    def qkv(B=2, H=2, Hkv=2, Lq=5, Lk=7, D=16, dtype=torch.float32):
        return (torch.randn(B, H, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
                torch.randn(B, Hkv, Lk, D, dtype=dtype))

    q, k, v = qkv()
    att = forkattn.attention
    mask = torch.ones(2, 7, dtype=torch.bool)
    return [
        _case("q 3-D", lambda: att(q[0], k, v), ValueError, "q"),
        _case("k 5-D", lambda: att(q, k[None], v), ValueError, "k"),
        _case("q not a tensor", lambda: att(q.tolist(), k, v), TypeError, "q"),
        _case("head_dim differs", lambda: att(q, k[..., :8], v), ValueError, "head_dim"),
        _case("k and v lengths differ", lambda: att(q, k, v[:, :, :6]), ValueError, "v"),
        _case("batch differs", lambda: att(q, k[:1], v[:1]), ValueError, "batch"),
        _case("heads not a multiple of kv heads", lambda: att(torch.randn(2, 3, 5, 16), k, v), ValueError, "head"),
        _case("int64 q", lambda: att(q.long(), k.long(), v.long()), TypeError, "q", "float32"),
        _case("mixed dtypes", lambda: att(q, k.double(), v), TypeError, "k", "float64"),
        _case("q on meta, k on cpu", lambda: att(q.to("meta"), k, v), ValueError, "device"),
        _case("mask wrong shape", lambda: att(q, k, v, key_padding_mask=mask[:, :6]), ValueError, "key_padding_mask"),
        _case("mask 3-D", lambda: att(q, k, v, key_padding_mask=mask[None]), ValueError, "key_padding_mask"),
        _case("mask float", lambda: att(q, k, v, key_padding_mask=mask.float()), TypeError, "key_padding_mask"),
        _case("mask int64 0/1 accepted", lambda: att(q, k, v, key_padding_mask=mask.long()), ACCEPT),
        _case("mask int32 0/1 accepted", lambda: att(q, k, v, key_padding_mask=mask.int()), ACCEPT),
        _case("scale nan", lambda: att(q, k, v, scale=float("nan")), ValueError, "scale"),
        _case("scale str", lambda: att(q, k, v, scale="0.5"), (TypeError, ValueError), "scale"),
        _case("scale True", lambda: att(q, k, v, scale=True), TypeError, "scale"),
        _case("scale np.float32 accepted", lambda: att(q, k, v, scale=np.float32(0.5)), ACCEPT),
        _case("scale 0-d tensor accepted", lambda: att(q, k, v, scale=torch.tensor(0.5)), ACCEPT),
        _case("causal not a bool", lambda: att(q, k, v, causal="yes"), TypeError, "causal"),
        _case("unknown backend", lambda: att(q, k, v, backend="nope"), ValueError, "backend"),
        _case("head_dim 0", lambda: att(*qkv(D=0)), ValueError, "head_dim"),
    ]


def varlen_cases():
    import torch

    import forkattn

    q, k, v = torch.randn(9, 2, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    cq, ck = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 5, 11], dtype=torch.int32)
    f = forkattn.attention_varlen
    return [
        _case("q 4-D", lambda: f(q[None], k, v, cq, ck, 5, 6), ValueError, "q"),
        _case("k head_dim differs", lambda: f(q, k[..., :8], v, cq, ck, 5, 6), ValueError, "k"),
        _case("q head_dim differs from k", lambda: f(q[..., :8], k, v, cq, ck, 5, 6), ValueError, "head_dim"),
        _case("cu_seqlens_q int64", lambda: f(q, k, v, cq.long(), ck, 5, 6), TypeError, "cu_seqlens_q"),
        _case("cu_seqlens_k float", lambda: f(q, k, v, cq, ck.float(), 5, 6), TypeError, "cu_seqlens_k"),
        _case("cu_seqlens_q 2-D", lambda: f(q, k, v, cq[None], ck, 5, 6), ValueError, "cu_seqlens_q"),
        _case("cu_seqlens lengths differ", lambda: f(q, k, v, cq[:2], ck, 5, 6), ValueError, "cu_seqlens"),
        _case("cu_seqlens_q not ending at total", lambda: f(q, k, v, torch.tensor([0, 4, 8], dtype=torch.int32),
                                                             ck, 5, 6), ValueError, "cu_seqlens_q"),
        _case("cu_seqlens_k decreasing", lambda: f(q, k, v, cq, torch.tensor([0, 6, 5], dtype=torch.int32), 5, 6),
              ValueError, "cu_seqlens_k"),
        _case("cu_seqlens_k past total", lambda: f(q, k, v, cq, torch.tensor([0, 5, 99], dtype=torch.int32), 5, 99),
              ValueError, "cu_seqlens_k"),
        _case("max_seqlen_q too small", lambda: f(q, k, v, cq, ck, 2, 6), ValueError, "max_seqlen_q"),
        _case("max_seqlen_k negative", lambda: f(q, k, v, cq, ck, 5, -1), ValueError, "max_seqlen_k"),
        _case("max_seqlen_q float", lambda: f(q, k, v, cq, ck, 5.0, 6), (TypeError, ValueError), "max_seqlen_q"),
        _case("int dtype q", lambda: f(q.long(), k.long(), v.long(), cq, ck, 5, 6), TypeError, "q", "float32"),
        _case("scale True", lambda: f(q, k, v, cq, ck, 5, 6, scale=True), TypeError, "scale"),
        _case("scale 0-d tensor accepted", lambda: f(q, k, v, cq, ck, 5, 6, scale=torch.tensor(0.25)), ACCEPT),
    ]


def disentangled_cases():
    """The public op, then the cpu kernel's _C entry points called directly with a bad table or
    position rows (what could read out of bounds if trusted)."""
    import torch

    import forkattn
    from forkattn import _native

    q, k, v = (torch.randn(2, 2, L, 16) for L in (5, 7, 7))
    pk, pq = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    table = forkattn.disentangled.relative_position_index(5, 7, max_relative_positions=4)
    f, fwd, bwd = forkattn.disentangled_attention, _native._C.disentangled_attention_fwd_cpu, \
        _native._C.disentangled_attention_bwd_cpu
    out, lse = fwd(q, k, v, pk, pq, table, None, 0.2, True, True)

    def table_with(i, value):
        t = table.clone()
        t[i] = value
        return t
    return [
        _case("public: pos_key rows", lambda: f(q, k, v, pk[:, :7], pq, max_relative_positions=4), ValueError,
              "pos_key"),
        _case("public: cpu backend, float64", lambda: f(q.double(), k.double(), v.double(), pk.double(), pq.double(),
                                                       max_relative_positions=4, backend="cpu"), TypeError, "float64"),
        _case("_C: table entry = 2 * span", lambda: fwd(q, k, v, pk, pq, table_with(3, 8), None, 0.2, True, True),
              ValueError, "rel_index[3] = 8"),
        _case("_C: table entry huge", lambda: fwd(q, k, v, pk, None, table_with(0, 2**40), None, 0.2, True, False),
              ValueError, "rel_index[0]"),
        _case("_C: table entry negative", lambda: fwd(q, k, v, None, pq, table_with(10, -1), None, 0.2, False, True),
              ValueError, "rel_index[10] = -1"),
        _case("_C: table too short", lambda: fwd(q, k, v, pk, pq, table[:-1], None, 0.2, True, True), ValueError,
              "rel_index", "11"),
        _case("_C: table int32", lambda: fwd(q, k, v, pk, pq, table.int(), None, 0.2, True, True), TypeError,
              "rel_index"),
        _case("_C: table 2-D", lambda: fwd(q, k, v, pk, pq, table[None], None, 0.2, True, True), ValueError,
              "rel_index"),
        _case("_C: bwd bad table", lambda: bwd(out, q, k, v, pk, pq, out, lse, table_with(1, 99), None, 0.2, True,
                                               True), ValueError, "rel_index[1] = 99"),
        _case("_C: pos_key missing with c2p", lambda: fwd(q, k, v, None, pq, table, None, 0.2, True, True),
              ValueError, "pos_key"),
        _case("_C: pos_query given without p2c", lambda: fwd(q, k, v, pk, pq, table, None, 0.2, True, False),
              ValueError, "pos_query"),
        _case("_C: pos rows differ", lambda: fwd(q, k, v, pk, pq[:, :6], table, None, 0.2, True, True), ValueError,
              "pos_key and pos_query"),
        _case("_C: pos_key 3 heads", lambda: fwd(q, k, v, torch.randn(3, 8, 16), pq, table, None, 0.2, True, True),
              ValueError, "pos_key"),
        _case("_C: pos_key 2-D", lambda: fwd(q, k, v, pk[0], pq, table, None, 0.2, True, True), ValueError,
              "pos_key"),
        _case("_C: pos_query no rows", lambda: fwd(q, k, v, None, pq[:, :0], table, None, 0.2, False, True),
              ValueError, "pos_query"),
        _case("_C: pos_query fp16", lambda: fwd(q, k, v, pk, pq.half(), table, None, 0.2, True, True), TypeError,
              "pos_query"),
        _case("_C: pos_key strided in D", lambda: fwd(q, k, v, torch.randn(2, 8, 32)[..., ::2], pq, table, None, 0.2,
                                                      True, True), ValueError, "pos_key", "stride"),
        _case("_C: grouped keys", lambda: fwd(q, k[:, :1], v[:, :1], pk, pq, table, None, 0.2, True, True),
              ValueError, "heads"),
        _case("_C: mask wrong length", lambda: fwd(q, k, v, pk, pq, table, torch.ones(2, 6, dtype=torch.bool), 0.2,
                                                   True, True), ValueError, "key_padding_mask"),
        _case("_C: bwd lse shape", lambda: bwd(out, q, k, v, pk, pq, out, lse[:, :1], table, None, 0.2, True, True),
              ValueError, "lse"),
        _case("_C: bwd dout dtype", lambda: bwd(out.double(), q, k, v, pk, pq, out, lse, table, None, 0.2, True,
                                                True), TypeError, "dout"),
        _case("_C: no relative term ignores the table", lambda: fwd(q, k, v, None, None, table_with(0, 99), None, 0.2,
                                                                    False, False), ACCEPT),
    ]


def mlm_cases():
    import torch

    import forkattn

    ids = torch.randint(5, 100, (3, 12))
    kw = dict(vocab_size=100, mask_token_id=4, special_token_ids=[0, 1, 2])
    m = forkattn.mlm_mask
    return [
        _case("input_ids 1-D", lambda: m(ids[0], **kw), ValueError, "input_ids"),
        _case("input_ids 3-D", lambda: m(ids[None], **kw), ValueError, "input_ids"),
        _case("input_ids float", lambda: m(ids.float(), **kw), TypeError, "input_ids"),
        _case("input_ids a list", lambda: m(ids.tolist(), **kw), TypeError, "input_ids"),
        _case("attention_mask wrong shape", lambda: m(ids, attention_mask=torch.ones(3, 11, dtype=torch.long), **kw),
              ValueError,
              "attention_mask"),
        _case("attention_mask float", lambda: m(ids, attention_mask=torch.ones(3, 12), **kw), TypeError,
              "attention_mask"),
        _case("attention_mask on meta", lambda: m(ids, attention_mask=torch.ones(3, 12, dtype=torch.long,
                                                                                  device="meta"), **kw),
              ValueError, "attention_mask"),
        _case("labels float", lambda: m(ids, labels=ids.float(), **kw), TypeError, "labels"),
        _case("word_ids wrong shape", lambda: m(ids, word_ids=ids[:, :5], **kw), ValueError, "word_ids"),
        _case("mask_prob 1.5", lambda: m(ids, **{**kw, "mask_prob": 1.5}), ValueError, "mask_prob"),
        _case("mask_prob nan", lambda: m(ids, **{**kw, "mask_prob": float("nan")}), ValueError, "mask_prob"),
        _case("mask_prob str", lambda: m(ids, **{**kw, "mask_prob": "0.1"}), (TypeError, ValueError), "mask_prob"),
        _case("replace probs sum > 1", lambda: m(ids, **kw, mask_replace_prob=0.8, random_replace_prob=0.3),
              ValueError, "random_replace_prob"),
        _case("mask_token_id out of vocab", lambda: m(ids, vocab_size=100, mask_token_id=100), ValueError,
              "mask_token_id"),
        _case("vocab_size 0", lambda: m(ids, vocab_size=0, mask_token_id=0), ValueError, "vocab_size"),
        _case("special id out of vocab", lambda: m(ids, vocab_size=100, mask_token_id=4, special_token_ids=[500]),
              ValueError, "vocab_size"),
        _case("mode unknown", lambda: m(ids, mode="always", **kw), ValueError, "mode"),
        _case("min_masked -1", lambda: m(ids, min_masked=-1, **kw), ValueError, "min_masked"),
        _case("seed 2**64", lambda: m(ids, seed=2**64, **kw), ValueError, "seed"),
        _case("seed float", lambda: m(ids, seed=1.5, **kw), TypeError, "seed"),
        _case("inplace on expanded", lambda: m(ids[:1].expand(3, 12), inplace=True, **kw), ValueError, "inplace"),
        _case("token id past vocab (cpu)", lambda: m(ids + 1000, backend="cpu", **kw), ValueError, "vocab_size"),
        _case("meta input accepted", lambda: m(ids.to("meta"), **kw), ACCEPT),
        _case("unknown backend", lambda: m(ids, backend="nope", **kw), ValueError, "backend"),
    ]


def kvcache_cases():
    import numpy as np
    import torch

    import forkattn

    def cache(**kw):
        args = dict(batch_size=2, num_kv_heads=1, max_seqlen=8, head_dim=4, dtype=torch.float32, device="cpu")
        args.update(kw)
        return forkattn.KVCache(**args)

    def paged():
        c = cache(page_size=2)
        k = torch.randn(2, 1, 1, 4)
        c.append(k, k)
        return c, k

    def block_table_append(value):
        c, k = paged()
        c.block_table[0, 0] = value
        c.append(k, k)

    def block_table_decode(value):
        c, k = paged()
        c.block_table[0, 0] = value
        forkattn.decode_attention(torch.randn(2, 1, 1, 4), c)

    def negative_seqlens():
        c = cache()
        c.seqlens[0] = -3
        k = torch.randn(2, 1, 1, 4)
        c.append(k, k, check=True)

    def decode(q, c=None, **kw):
        c = c or cache()
        k = torch.randn(2, 1, 2, 4)
        c.append(k, k)
        return forkattn.decode_attention(q, c, **kw)

    def meta_cache():
        """Issue 12: KVCache(device="meta") failed late (Tensor.item() on meta). Either a clear
        ValueError naming the device up front, or a cache that works on meta (shapes only)."""
        try:
            c = cache(device="meta")
        except ValueError as e:
            assert "device" in str(e), e
            return
        k = torch.empty(2, 1, 1, 4, device="meta")
        c.append(k, k)
        out = forkattn.decode_attention(torch.empty(2, 1, 1, 4, device="meta"), c)
        assert out.shape == (2, 1, 1, 4) and out.device.type == "meta"

    k1 = torch.randn(2, 1, 1, 4)
    return [
        _case("batch_size 0", lambda: cache(batch_size=0), ValueError, "batch_size"),
        _case("max_seqlen -1", lambda: cache(max_seqlen=-1), ValueError, "max_seqlen"),
        _case("head_dim float", lambda: cache(head_dim=4.0), TypeError, "head_dim"),
        _case("head_dim huge", lambda: cache(head_dim=10**6), ValueError, "head_dim"),
        _case("dtype int64", lambda: cache(dtype=torch.int64), TypeError, "dtype"),
        _case("dtype a str", lambda: cache(dtype="float32"), TypeError, "dtype"),
        _case("page_size 0", lambda: cache(page_size=0), ValueError, "page_size"),
        _case("num_pages 0", lambda: cache(page_size=2, num_pages=0), ValueError, "num_pages"),
        _case("device meta: clear error or works", meta_cache, ACCEPT),
        _case("device nonsense", lambda: cache(device="nodevice"), (ValueError, RuntimeError), "device"),
        _case("check not a bool", lambda: cache(check="yes"), TypeError, "check"),
        # append
        _case("append k 3-D", lambda: cache().append(k1[0], k1[0]), ValueError, "k"),
        _case("append k wrong batch", lambda: cache().append(k1[:1], k1[:1]), ValueError, "k"),
        _case("append k wrong head_dim", lambda: cache().append(k1[..., :3], k1[..., :3]), ValueError, "k"),
        _case("append k float64", lambda: cache().append(k1.double(), k1.double()), TypeError, "k"),
        _case("append v shape differs", lambda: cache().append(k1, torch.randn(2, 1, 2, 4)), ValueError, "v"),
        _case("append v not a tensor", lambda: cache().append(k1, 3), TypeError, "v"),
        _case("append past max_seqlen", lambda: cache().append(torch.randn(2, 1, 9, 4), torch.randn(2, 1, 9, 4)),
              forkattn.KVCacheOverflowError, "max_seqlen"),
        _case("append zero tokens", lambda: cache().append(k1[:, :, :0], k1[:, :, :0]), ValueError, "token"),
        _case("append check not a bool", lambda: cache().append(k1, k1, check=1), TypeError, "check"),
        _case("append block_table entry 10**6", lambda: block_table_append(10**6), ValueError, "block_table"),
        _case("append block_table entry 2**31-1", lambda: block_table_append(2**31 - 1), ValueError, "block_table"),
        _case("append negative seqlens, check=True", negative_seqlens, ValueError, "seqlens"),
        # decode_attention
        _case("decode q 3-D", lambda: decode(torch.randn(2, 1, 4)), ValueError, "q"),
        _case("decode q wrong head_dim", lambda: decode(torch.randn(2, 1, 1, 8)), ValueError, "head_dim"),
        _case("decode q float64", lambda: decode(torch.randn(2, 1, 1, 4, dtype=torch.float64)), TypeError, "q"),
        _case("decode 17 new tokens", lambda: decode(torch.randn(2, 1, 17, 4)), ValueError, "new tokens"),
        _case("decode cache not a KVCache", lambda: forkattn.decode_attention(torch.randn(2, 1, 1, 4), {}),
              TypeError, "cache"),
        _case("decode scale True", lambda: decode(torch.randn(2, 1, 1, 4), scale=True), TypeError, "scale"),
        _case("decode scale inf", lambda: decode(torch.randn(2, 1, 1, 4), scale=float("inf")), ValueError, "scale"),
        _case("decode scale np.float32 accepted", lambda: decode(torch.randn(2, 1, 1, 4), scale=np.float32(0.5)),
              ACCEPT),
        _case("decode block_table entry 10**6", lambda: block_table_decode(10**6), ValueError, "block_table"),
        _case("decode block_table entry 2**31-1", lambda: block_table_decode(2**31 - 1), ValueError, "block_table"),
    ]


def collator_cases():
    import torch

    from forkattn.data import MLMCollator

    col = MLMCollator([0, 1, 2, 4], vocab_size=100, mask_token_id=4, pad_token_id=0)
    good = {"input_ids": [1, 50, 60, 2]}
    return [
        _case("no examples", lambda: col([]), ValueError, "examples"),
        _case("attention_mask longer", lambda: col([good, {"input_ids": [1, 2], "attention_mask": [1, 1, 1]}]),
              ValueError, "attention_mask"),
        _case("token_type_ids shorter", lambda: col([{"input_ids": [1, 2], "token_type_ids": [0]}]), ValueError,
              "token_type_ids"),
        _case("2-D tensor example", lambda: col([good, {"input_ids": torch.ones(2, 3, dtype=torch.long)}]),
              ValueError, "input_ids"),
        _case("bare 2-D tensor example", lambda: col([torch.ones(2, 3, dtype=torch.long)]), ValueError, "input_ids"),
        _case("nested lists", lambda: col([{"input_ids": [[1, 2], [3, 4]]}]), ValueError, "input_ids"),
        _case("no input_ids", lambda: col([{"ids": [1, 2]}]), ValueError, "input_ids"),
        _case("input_ids an int", lambda: col([{"input_ids": 7}]), ValueError, "input_ids"),
        _case("not a tokenizer", lambda: MLMCollator(3.5), TypeError, "tokenizer_or_special_ids"),
        _case("special ids without vocab_size", lambda: MLMCollator([0, 1]), ValueError, "vocab_size"),
        _case("pad_to_multiple_of 0", lambda: MLMCollator([0], vocab_size=9, mask_token_id=4, pad_token_id=0,
                                                          pad_to_multiple_of=0), ValueError, "pad_to_multiple_of"),
        _case("mlm_probability 2", lambda: MLMCollator([0], vocab_size=9, mask_token_id=4, pad_token_id=0,
                                                       mlm_probability=2.0)([good]), ValueError, "mask_prob"),
        _case("whole_word without word_ids", lambda: MLMCollator([0], vocab_size=99, mask_token_id=4, pad_token_id=0,
                                                                 whole_word=True)([good]), ValueError, "word_ids"),
    ]


def from_pretrained_cases():
    import json as _json
    import tempfile

    import torch

    from forkattn.models.bert import BertConfig, BertModel
    from forkattn.models.gpt import GPT, GPTConfig

    tmp = tempfile.mkdtemp()
    bert_dir, gpt_dir = os.path.join(tmp, "bert"), os.path.join(tmp, "gpt")
    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)).save_pretrained(bert_dir)
    GPT(GPTConfig(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt_dir)

    def edited(src, **changes):
        import shutil

        dst = tempfile.mkdtemp()
        for f in os.listdir(src):
            shutil.copy(os.path.join(src, f), dst)
        with open(os.path.join(dst, "config.json")) as f:
            cfg = _json.load(f)
        cfg.update(changes)
        with open(os.path.join(dst, "config.json"), "w") as f:
            _json.dump(cfg, f)
        return dst

    def no_weights(src):
        d = edited(src)
        os.remove(os.path.join(d, "model.safetensors"))
        return d

    def garbage_weights(src):
        d = edited(src)
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(b"not a safetensors file")
        return d

    def bad_json(src):
        d = edited(src)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{not json")
        return d

    del torch
    return [
        _case("bert missing folder", lambda: BertModel.from_pretrained(os.path.join(tmp, "nope")), FileNotFoundError,
              "nope"),
        _case("bert no weights", lambda: BertModel.from_pretrained(no_weights(bert_dir)), FileNotFoundError,
              "model.safetensors"),
        _case("bert intermediate_size disagrees", lambda: BertModel.from_pretrained(edited(bert_dir, intermediate_size=24)),
              ValueError, "intermediate.dense.weight: checkpoint (32, 16), model (24, 16)"),
        _case("bert hidden_size disagrees", lambda: BertModel.from_pretrained(edited(bert_dir, hidden_size=32,
                                                                                      intermediate_size=32)),
              ValueError, "embeddings.word_embeddings.weight: checkpoint (40, 16), model (40, 32)"),
        _case("bert mismatch ignored on request", lambda: BertModel.from_pretrained(edited(bert_dir, intermediate_size=24),
                                                                                      ignore_mismatched_sizes=True),
              ACCEPT),
        _case("bert ignore_mismatched_sizes not a bool", lambda: BertModel.from_pretrained(bert_dir,
                                                                                            ignore_mismatched_sizes="y"),
              TypeError, "ignore_mismatched_sizes"),
        _case("bert garbage weights file", lambda: BertModel.from_pretrained(garbage_weights(bert_dir)), ValueError,
              "model.safetensors"),
        _case("gpt garbage weights file", lambda: GPT.from_pretrained(garbage_weights(gpt_dir)), ValueError,
              "model.safetensors"),
        _case("bert config not json", lambda: BertModel.from_pretrained(bad_json(bert_dir)), ValueError, ""),
        _case("gpt missing folder", lambda: GPT.from_pretrained(os.path.join(tmp, "nope")), FileNotFoundError, "nope"),
        _case("gpt no weights", lambda: GPT.from_pretrained(no_weights(gpt_dir)), FileNotFoundError, "model.safetensors"),
        _case("gpt n_inner disagrees", lambda: GPT.from_pretrained(edited(gpt_dir, n_inner=48)), ValueError,
              "mlp.c_fc.weight: checkpoint (64, 16), model (48, 16)"),
        _case("gpt vocab disagrees", lambda: GPT.from_pretrained(edited(gpt_dir, vocab_size=41)), ValueError,
              "transformer.wte.weight: checkpoint (40, 16), model (41, 16)"),
        _case("gpt mismatch ignored on request", lambda: GPT.from_pretrained(edited(gpt_dir, n_inner=48),
                                                                              ignore_mismatched_sizes=True), ACCEPT),
    ]


def cli_cases():
    import tempfile

    from forkattn.train import main

    tmp = tempfile.mkdtemp()
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("the cat sat on the mat.\n\nthe dog ran far.\n")
    nolabel = os.path.join(tmp, "nolabel.csv")
    with open(nolabel, "w") as f:
        f.write("text,sentiment\ngood,pos\n")
    empty = os.path.join(tmp, "empty.csv")
    open(empty, "w").close()
    model = os.path.join(tmp, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write("{}")

    def cli(*argv):
        """A command-line run: SystemExit(status) carrying stderr's text, so the case can check both."""
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(list(argv))
            except SystemExit as e:
                rc = e.code
        text = err.getvalue()
        if rc == 0:
            return rc
        lines = [l for l in text.splitlines() if l.strip()]
        if "Traceback" in text or not lines or ": error: " not in lines[-1]:
            raise RuntimeError(f"status {rc} without a clean 'error:' line: {text[-500:]}")
        raise SystemExit(f"status {rc}: {lines[-1]}")  # (argparse puts its usage lines before it)

    missing = os.path.join(tmp, "missing.txt")
    return [
        _case("--help", lambda: cli("--help"), ACCEPT),
        _case("no command", lambda: cli(), SystemExit, "status 2"),
        _case("unknown command", lambda: cli("bert"), SystemExit, "status 2", "unknown command"),
        _case("gpt --data missing", lambda: cli("gpt", "--data", missing, "--out", os.path.join(tmp, "o1")),
              SystemExit, "status 2", missing),
        _case("gpt --steps not an int", lambda: cli("gpt", "--data", corpus, "--out", tmp, "--steps", "x"),
              SystemExit, "status 2", "--steps"),
        _case("gpt --dtype int8", lambda: cli("gpt", "--data", corpus, "--out", tmp, "--dtype", "int8"), SystemExit,
              "status 2", "dtype"),
        _case("gpt --init-from missing", lambda: cli("gpt", "--data", corpus, "--out", os.path.join(tmp, "o2"),
                                                     "--init-from", missing), SystemExit, "status 2", "--init-from"),
        _case("gpt --tokenizer missing", lambda: cli("gpt", "--data", corpus, "--out", os.path.join(tmp, "o3"),
                                                     "--tokenizer", missing), SystemExit, "status 2", "--tokenizer"),
        _case("gpt --block-size larger than the data", lambda: cli("gpt", "--data", corpus, "--out",
                                                                   os.path.join(tmp, "o4"), "--vocab-size", "260",
                                                                   "--block-size", "500", "--device", "cpu",
                                                                   "--no-progress"),
              SystemExit, "status 2", "--block-size"),
        _case("bert-mlm --data missing", lambda: cli("bert-mlm", "--data", missing, "--out", tmp), SystemExit,
              "status 2", missing),
        _case("bert-mlm --data is a folder", lambda: cli("bert-mlm", "--data", tmp, "--out", tmp), SystemExit,
              "status 2", "--data"),
        _case("bert-finetune --model missing", lambda: cli("bert-finetune", "--model", missing, "--train", nolabel,
                                                           "--out", tmp), SystemExit, "status 2", "--model"),
        _case("bert-finetune --train missing", lambda: cli("bert-finetune", "--model", model, "--train", missing,
                                                           "--out", tmp), SystemExit, "status 2", missing),
        _case("bert-finetune --task unknown", lambda: cli("bert-finetune", "--task", "nope", "--model", model,
                                                          "--train", nolabel, "--out", tmp), SystemExit, "status 2",
              "--task"),
    ]


ENTRIES = {"attention": attention_cases, "attention_varlen": varlen_cases, "mlm_mask": mlm_cases,
           "disentangled_attention": disentangled_cases,
           "kvcache_append_decode": kvcache_cases, "mlm_collator": collator_cases,
           "from_pretrained": from_pretrained_cases, "cli": cli_cases}


# --- the subprocess side ---------------------------------------------------------------------------

def _run_entry(entry: str, first: int = 0) -> None:
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    for name, fn, exc, needles in ENTRIES[entry]()[first:]:
        print("START " + json.dumps(name), flush=True)
        try:
            fn()
            got = {"case": name, "raised": None, "message": ""}
        except BaseException as e:  # noqa: BLE001 - reported, judged by the parent
            got = {"case": name, "raised": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                   "message": str(e)[:600]}
        exp = exc if isinstance(exc, tuple) else (exc,)
        got["expected"] = [e.__name__ for e in exp] if exc is not ACCEPT else None
        got["needles"] = list(needles)
        print("RESULT " + json.dumps(got), flush=True)


def _judge(r: dict) -> str:
    """'' when the case behaved as expected, else what went wrong."""
    if r["expected"] is None:
        return "" if r["raised"] is None else f"refused a valid input: {r['raised']}: {r['message']}"
    if r["raised"] is None:
        return f"returned normally; expected {' or '.join(r['expected'])}"
    if not set(r["expected"]) & set(r["mro"]):
        return f"raised {r['raised']}: {r['message']!r}; expected {' or '.join(r['expected'])}"
    missing = [n for n in r["needles"] if n.lower() not in r["message"].lower()]
    if missing:
        return f"{r['raised']} message {r['message']!r} does not name {missing}"
    return ""


def _start(entry: str, first: int = 0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "python"))
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), entry, str(first)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def launched():
    """Every entry's first subprocess, started together (most of their time is importing torch)."""
    procs = {entry: _start(entry) for entry in ENTRIES}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_bad_inputs_raise_clean_errors(entry, launched):
    """One subprocess runs the entry's cases; when a case kills it (segfault, abort) or hangs, that case
    is reported and a fresh subprocess goes on with the next one."""
    problems, n_run, first, proc = [], 0, 0, launched[entry]
    for _ in range(20):  # at most 20 crashes per entry
        try:
            out, err = proc.communicate(timeout=300)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = "timeout (300 s)"
        started = [json.loads(l[6:]) for l in out.splitlines() if l.startswith("START ")]
        results = [json.loads(l[7:]) for l in out.splitlines() if l.startswith("RESULT ")]
        problems += [f"{r['case']}: {why}" for r in results if (why := _judge(r))]
        n_run += len(started)
        if len(results) < len(started):  # died inside a case: report it, resume after it
            problems.append(f"{started[len(results)]}: the process died ({rc}) in this case; stderr: {err[-600:]}")
            first += len(started)
            proc = _start(entry, first)
            continue
        if rc != 0:
            problems.append(f"the process exited with {rc} outside any case: {err[-1500:]}")
        break
    assert n_run, f"no case ran: {problems}"
    assert not problems, f"{len(problems)} of {n_run} {entry} cases:\n" + "\n".join(problems)


if __name__ == "__main__":
    _run_entry(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
