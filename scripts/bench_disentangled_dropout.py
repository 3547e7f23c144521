"""DeBERTa attention dropout on a GPU (issue #17: the cuda backend's DROPOUT instantiations of
kernels/disentangled, forward and backward): first, per head_dim 32 / 64 / 128, the cuda backend's
output and five gradients against the float64 reference fed the same Philox mask (2x rule, padded
with NaN keys and an empty row: tests/test_disentangled_cuda.py's dropout test), so a wrong kernel
never gets a timing line; then fwd+bwd time at B4 H12 L512 span 256 fp16 of the cuda backend at
dropout_p 0 and 0.1 (the mask's cost) and the triton backend at 0.1. One line per (head_dim,
impl); run by scripts/gpu_check.sh. Exits 0 without a GPU."""
import sys

import torch

sys.path.insert(0, "python")
sys.path.insert(0, "tests")
sys.path.insert(0, "scripts")
import forkattn  # noqa: E402
from bench_disentangled_head_dims import SPAN, inputs, time_fwd_bwd  # noqa: E402


def check(D):
    from test_disentangled_cuda import test_gpu_dropout_matches_fp64_with_the_same_mask as check_case

    check_case(2, 2, 97, 129, D, torch.float16, "c2p+p2c", 16, 40, "nan", 0.2)
    check_case(1, 2, 65, 7, D, torch.bfloat16, "p2c", -1, 5, "pad", 0.5)
    return "ok"


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_disentangled_dropout: skipped (no CUDA device)")
        return 0
    status = 0
    for D in (32, 64, 128):
        try:
            print(f"D{D} cuda dropout, 2x rule vs fp64 with the same mask (out and five gradients): {check(D)}")
        except Exception as exc:  # report and go on to the other head_dims
            print(f"D{D} cuda dropout check FAILED: {type(exc).__name__}: {exc}")
            status = 1
            continue
        q, k, v, pk, pq, dout, mask = inputs(D, torch.float16)
        leaves = [t.requires_grad_() for t in (q, k, v, pk, pq)]
        kw = dict(max_relative_positions=2 * SPAN, position_buckets=SPAN, key_padding_mask=mask, seed=1234)
        impls = {
            "cuda p=0": lambda: forkattn.disentangled_attention(*leaves, backend="cuda", **kw),
            "cuda p=0.1": lambda: forkattn.disentangled_attention(*leaves, backend="cuda", dropout_p=0.1, **kw),
            "triton p=0.1": lambda: forkattn.disentangled_attention(*leaves, backend="triton", dropout_p=0.1, **kw),
        }
        ms = time_fwd_bwd(impls, leaves, dout, f"D{D}")
        for name, t in ms.items():
            ratio = f"{t / ms['cuda p=0']:5.2f}x cuda p=0's time" if "cuda p=0" in ms else ""
            print(f"  D{D} B4 H12 L512 fp16 fwd+bwd {name:13} {t:8.3f} ms  {ratio}")
    return status


if __name__ == "__main__":
    sys.exit(main())
