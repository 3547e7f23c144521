"""DeBERTa attention at head_dim 32 and 128 on a GPU (issue #17: cuda forward and backward at 32 / 64 /
128; the deberta bench covers 64): fwd+bwd of forkattn's cuda backend (kernels/disentangled, both
passes hand-written since the D32/D128 backward instantiations) and its triton backend, against the
eager disentangled attention in the same dtype (forkattn.reference's indexed form: the L x L c2p /
p2c gathers transformers' DisentangledSelfAttention does). First checks the cuda backend's output
and gradients against fp64 with the 2x rule on a small padded case, so a wrong kernel never gets a
timing line. B4 H12 L512 span 256, buckets, padded L/2..L, fp16. One line per (head_dim, impl);
run by scripts/gpu_check.sh. Exits 0 without a GPU."""
import sys

import torch

sys.path.insert(0, "python")
sys.path.insert(0, "tests")
import forkattn  # noqa: E402
from forkattn import reference  # noqa: E402

B, H, L, SPAN = 4, 12, 512, 256


def inputs(D, dtype, B=B, L=L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(B, H, L, D, device="cuda", generator=g).to(dtype) for _ in range(4))
    pk, pq = (torch.randn(H, 2 * SPAN, D, device="cuda", generator=g).to(dtype) for _ in range(2))
    lens = torch.linspace(L // 2, L, B, device="cuda").long()
    mask = torch.arange(L, device="cuda")[None, :] < lens[:, None]
    return q, k, v, pk, pq, dout, mask


def time_fwd_bwd(impls, leaves, dout, label):
    """Median ms of forward + backward (gradients of `leaves` for `dout`) per implementation, with
    triton's do_bench; an implementation that raises is reported on its own line and left out."""
    from triton.testing import do_bench

    ms = {}
    for name, fn in impls.items():
        try:
            ms[name] = do_bench(lambda: torch.autograd.grad(fn(), leaves, dout), warmup=5, rep=40)
        except Exception as exc:
            print(f"  {label} {name}: {type(exc).__name__}: {exc}")
    return ms


def check(D):
    """tests/test_disentangled_cuda.py's compare (2x rule against fp64 for out and the five
    gradients) on a small padded case with NaN in padded keys, at this head_dim."""
    from test_disentangled_cuda import compare

    compare(2, 2, 97, 129, D, torch.float16, "c2p+p2c", 16, 40, "nan", None)
    return "ok"


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_disentangled_head_dims: skipped (no CUDA device)")
        return 0
    status = 0
    for D in (32, 128):
        try:
            print(f"D{D} cuda 2x rule vs fp64 (out, dq, dk, dv, dpos_key, dpos_query): {check(D)}")
        except Exception as exc:  # report and go on to the other head_dim
            print(f"D{D} cuda check FAILED: {exc}")
            status = 1
            continue
        q, k, v, pk, pq, dout, mask = inputs(D, torch.float16)
        leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
        table = reference.relative_position_index(L, L, max_relative_positions=2 * SPAN, position_buckets=SPAN,
                                                  device="cuda")
        kw = dict(max_relative_positions=2 * SPAN, position_buckets=SPAN, key_padding_mask=mask)
        impls = {
            "eager": lambda: reference.disentangled_attention_indexed(*leaves, table, mask, (3 * D) ** -0.5, True,
                                                                       True),
            "forkattn-cuda": lambda: forkattn.disentangled_attention(*leaves, backend="cuda", **kw),
            "forkattn-triton": lambda: forkattn.disentangled_attention(*leaves, backend="triton", **kw),
        }
        ms = time_fwd_bwd(impls, leaves, dout, f"D{D}")
        for name, t in ms.items():
            ratio = f"{ms['eager'] / t:5.2f}x vs eager" if "eager" in ms else ""
            print(f"  D{D} B{B} H{H} L{L} fp16 fwd+bwd {name:16} {t:8.3f} ms  {ratio}")
    return status


if __name__ == "__main__":
    sys.exit(main())
