"""Attention dropout's cost on a GPU (issue #16's goal: at most 15% over dropout_p = 0): fwd+bwd of
forkattn's cuda and triton backends at dropout_p 0 and 0.1, with SDPA's dropout path as the peer,
for BERT-base padded L512 and GPT-2 L1024 causal. One line per (shape, implementation); run by
scripts/gpu_check.sh. Exits 0 without a GPU."""
import sys

import torch

sys.path.insert(0, "python")
import forkattn  # noqa: E402

SHAPES = {  # name: (B, H, L, D, causal, padded)
    "bert-base L512 padded": (8, 12, 512, 64, False, True),
    "gpt2 L1024 causal": (4, 12, 1024, 64, True, False),
}


def fwd_bwd(fn, q, k, v, g):
    def step():
        out = fn(q, k, v)
        torch.autograd.grad(out, (q, k, v), g)
    return step


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_attention_dropout: skipped (no CUDA device)")
        return 0
    from triton.testing import do_bench

    gpu = torch.cuda.get_device_name()
    fam = forkattn.backends.get("attention")
    for name, (B, H, L, D, causal, padded) in SHAPES.items():
        q, k, v, g = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16, requires_grad=i < 3)
                      for i in range(4))
        mask = None
        if padded:  # lengths from L/2 to L
            lens = torch.linspace(L // 2, L, B, device="cuda").long()
            mask = torch.arange(L, device="cuda")[None, :] < lens[:, None]
        impls = {}
        for backend in ("cuda", "triton"):
            if fam.why_not(backend, "cuda", dtype=torch.float16, head_dim=D) is None:
                impls[backend] = lambda p, b=backend: (lambda q, k, v: forkattn.attention(
                    q, k, v, causal=causal, key_padding_mask=mask, dropout_p=p, seed=1, backend=b))
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        impls["sdpa"] = lambda p: (lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=sdpa_mask, dropout_p=p, is_causal=causal))
        for impl, make in impls.items():
            try:
                t0, t1 = (do_bench(fwd_bwd(make(p), q, k, v, g)) for p in (0.0, 0.1))
            except Exception as e:  # a backend failing here must not hide the others' figures
                print(f"{gpu} | {name} | {impl}: FAILED {type(e).__name__}: {e}")
                continue
            print(f"{gpu} | {name} | {impl:6} fwd+bwd: p=0 {t0:.3f} ms, p=0.1 {t1:.3f} ms, "
                  f"dropout +{100 * (t1 / t0 - 1):.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
