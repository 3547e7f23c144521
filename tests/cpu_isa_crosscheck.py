"""A compact run of every CPU kernel under one ISA variant, for tests/test_cpu_isa.py and
scripts/gpu_check.sh: python tests/cpu_isa_crosscheck.py OUT.pt, with FORKATTN_CPU_CAPABILITY set
to the variant (the choice is made once per process, so each variant runs in its own process).

Each output is held to the 2x rule against fp64 (our max error <= 2x eager's in the same dtype +
1e-5); the outputs are saved to OUT.pt so that the caller can check that the variants agree
closely with each other. Prints the variant that ran (build_info()["cpu_isa"]) on the last line."""
import math
import sys

import torch
import torch.nn.functional as F

import forkattn
from forkattn import KVCache, reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from attn_utils import assert_within_budget, make_padding, make_qkv  # noqa: E402

C = forkattn._native._C
OUT = {}


def check(name, ours, eager, ref64):
    assert_within_budget(name, ours, eager, ref64)
    OUT[name] = ours.detach().clone()


def attention_cases():
    gen = torch.Generator().manual_seed(0)
    cases = [  # B, H, Hkv, Lq, Lk, D, dtype, causal, padded
        (2, 4, 2, 97, 129, 64, torch.float32, False, True),
        (1, 3, 3, 129, 129, 32, torch.float32, True, False),
        (2, 2, 1, 7, 1025, 80, torch.bfloat16, False, True),
        (1, 2, 2, 33, 65, 16, torch.float16, True, False),
    ]
    for i, (B, H, Hkv, Lq, Lk, D, dt, causal, padded) in enumerate(cases):
        q, k, v = make_qkv(B, H, Hkv, Lq, Lk, D, dt)
        mask = make_padding(B, Lk, generator=gen) if padded else None
        kw = dict(causal=causal, key_padding_mask=mask)
        out = forkattn.attention(q, k, v, backend="cpu", **kw)
        eager = reference.attention(q, k, v, **kw)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference.attention(q64, k64, v64, **kw)
        check(f"attn{i}.out", out, eager, ref)
        g = torch.randn_like(out)
        for name, a, b, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), g),
                                 torch.autograd.grad(eager, (q, k, v), g),
                                 torch.autograd.grad(ref, (q64, k64, v64), g.double())):
            check(f"attn{i}.{name}", a, b, r)
    # dropout (Philox and the u16 keep mask): no fp64 reference of its own; the variants must agree
    q, k, v = make_qkv(2, 2, 2, 65, 200, 64, torch.float32)
    out = forkattn.attention(q, k, v, backend="cpu", dropout_p=0.3, seed=1234)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    OUT.update({"drop.out": out.detach(), "drop.dq": dq, "drop.dk": dk, "drop.dv": dv})


def varlen_case():
    lens = [1, 97, 130]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total, H, D = sum(lens), 3, 64
    q, k, v = (torch.randn(total, H, D, requires_grad=True) for _ in range(3))
    out = forkattn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="cpu")
    eager = reference.attention_varlen(q, k, v, cu, cu, causal=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention_varlen(q64, k64, v64, cu, cu, causal=True)
    check("varlen.out", out, eager, ref)
    g = torch.randn_like(out)
    for name, a, b, r in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), g),
                             torch.autograd.grad(eager, (q, k, v), g),
                             torch.autograd.grad(ref, (q64, k64, v64), g.double())):
        check(f"varlen.{name}", a, b, r)


def decode_case():
    for dt in (torch.float32, torch.bfloat16):
        B, H, Hkv, L, T, D = 2, 8, 2, 97, 3, 64
        cache = KVCache(B, Hkv, 128, D, dtype=dt, device="cpu")
        k = torch.randn(B, Hkv, L, D).to(dt)
        v = torch.randn(B, Hkv, L, D).to(dt)
        cache.append(k, v, backend="cpu")
        q = torch.randn(B, H, T, D).to(dt)
        out = forkattn.decode_attention(q, cache, backend="cpu")
        eager = reference.attention(q, k, v, causal=True)
        ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
        check(f"decode.{str(dt)[6:]}", out, eager, ref)


def disentangled_case():
    B, H, L, D, span = 2, 2, 97, 32, 16
    q, k, v = make_qkv(B, H, H, L, L, D, torch.float32)
    pk = torch.randn(H, 2 * span, D, requires_grad=True)
    pq = torch.randn(H, 2 * span, D, requires_grad=True)
    mask = make_padding(B, L, generator=torch.Generator().manual_seed(1))
    kw = dict(max_relative_positions=2 * span, position_buckets=span, key_padding_mask=mask)
    out = forkattn.disentangled_attention(q, k, v, pk, pq, backend="cpu", **kw)
    eager = reference.disentangled_attention(q, k, v, pk, pq, **kw)
    ins64 = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pq)]
    ref = reference.disentangled_attention(*ins64, **kw)
    check("deberta.out", out, eager, ref)
    g = torch.randn_like(out)
    for name, a, b, r in zip(("dq", "dk", "dv", "dpos_key", "dpos_query"),
                             torch.autograd.grad(out, (q, k, v, pk, pq), g),
                             torch.autograd.grad(eager, (q, k, v, pk, pq), g),
                             torch.autograd.grad(ref, ins64, g.double())):
        check(f"deberta.{name}", a, b, r)


def encoder_case():
    for rows, cols in ((7, 384), (129, 97)):
        x = torch.randn(rows, cols)
        bias, res, w, lb = torch.randn(cols), torch.randn(rows, cols), torch.randn(cols), torch.randn(cols)
        y = x.clone()
        C.bias_gelu_cpu(y, bias)
        check(f"gelu.{cols}", y, F.gelu(x + bias), F.gelu(x.double() + bias.double()))
        y = x.clone()
        C.bias_residual_layernorm_cpu(y, res, bias, w, lb, 1e-12)
        eager = F.layer_norm(x + bias + res, (cols,), w, lb, 1e-12)
        ref = F.layer_norm((x + bias + res).double(), (cols,), w.double(), lb.double(), 1e-12)
        check(f"layernorm.{cols}", y, eager, ref)


def mlm_case():
    ids = torch.randint(5, 30000, (4, 129))
    masked, labels = forkattn.mlm_mask(ids, vocab_size=30522, mask_token_id=103, special_token_ids=[101, 102],
                                       seed=7, backend="cpu")
    OUT["mlm.ids"], OUT["mlm.labels"] = masked, labels


if __name__ == "__main__":
    torch.manual_seed(0)
    torch.set_num_threads(2)
    for case in (attention_cases, varlen_case, decode_case, disentangled_case, encoder_case, mlm_case):
        case()
    torch.save(OUT, sys.argv[1])
    print(forkattn.build_info()["cpu_isa"])
