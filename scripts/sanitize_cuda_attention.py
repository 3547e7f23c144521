"""A small run of every CUDA attention kernel for compute-sanitizer (memcheck, racecheck):
odd lengths, padding with a fully padded sequence, causal with Lq > Lk, GQA, every head_dim,
both dtypes, and varlen. Exits 0 without running when the cuda backend is unavailable."""
import sys

import torch

sys.path.insert(0, "python")
import forkattn  # noqa: E402


def main() -> int:
    why = forkattn.backends.get("attention").why_not("cuda", "cuda", dtype=torch.float16, head_dim=64)
    if why:
        print(f"sanitize_cuda_attention: skipped ({why})")
        return 0
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for D in (32, 64, 128):
            for causal in (False, True):
                q = torch.randn(2, 4, 77, D, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype, requires_grad=True)
                mask = torch.ones(2, 70, dtype=torch.bool, device="cuda")
                mask[1] = False
                out = forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, backend="cuda")
                out.float().sum().backward()
    cu = torch.tensor([0, 5, 5, 135], dtype=torch.int32, device="cuda")
    q = torch.randn(135, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    kv = torch.randn(135, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    forkattn.attention_varlen(q, kv, kv, cu, cu, 130, 130, causal=True, backend="cuda").float().sum().backward()
    torch.cuda.synchronize()
    print("sanitize_cuda_attention: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
