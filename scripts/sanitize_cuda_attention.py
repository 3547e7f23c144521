"""A small run of every CUDA attention kernel for compute-sanitizer (memcheck, racecheck):
odd lengths, padding with a fully padded sequence and holes, causal with Lq > Lk, GQA, every
head_dim, both dtypes, dropout (fp16), and varlen. Padded keys and values hold inf / -inf / NaN, and the outputs
are checked too: equal to the run without the garbage, padded keys' gradients exactly zero, no NaN
(issue 12, section 2); a NaN query row gives NaN in exactly that row (section 3). Exits 1 on a
wrong result, 0 without running when the cuda backend is unavailable."""
import sys

import torch

sys.path.insert(0, "python")
import forkattn  # noqa: E402

FAILURES = []


def _grads(q, k, v, mask, causal, g):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = forkattn.attention(*leaves, causal=causal, key_padding_mask=mask, backend="cuda")
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _expect(ok, what):
    if not ok:
        FAILURES.append(what)
        print(f"sanitize_cuda_attention: WRONG: {what}", flush=True)


def check_garbage(dtype, D, causal, garbage):
    q = torch.randn(2, 4, 77, D, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 70, D, device="cuda", dtype=dtype)
    g = torch.randn(2, 4, 77, D, device="cuda", dtype=dtype)
    mask = torch.ones(2, 70, dtype=torch.bool, device="cuda")
    mask[0, :3] = False   # a hole before the first valid key
    mask[0, 60:] = False  # right padding inside the second key tile
    mask[1] = False       # a fully padded sequence
    clean = _grads(q, k, v, mask, causal, g)
    pad = ~mask[:, None, :, None].expand_as(k)
    dirty = _grads(q, k.masked_fill(pad, garbage), v.masked_fill(pad, garbage), mask, causal, g)
    case = f"{dtype} D={D} causal={causal} garbage={garbage}"
    for name, a, b in zip(("out", "dq", "dk", "dv"), dirty, clean):
        _expect(not torch.isnan(a).any().item(), f"{case}: NaN in {name}")
        _expect(torch.equal(a, b), f"{case}: {name} changed by garbage in padded keys")
    for name, t in (("dk", dirty[2]), ("dv", dirty[3])):
        _expect(bool((t[pad] == 0).all()), f"{case}: {name} of padded keys not zero")


def check_nan_query(dtype, D):
    q = torch.randn(1, 2, 77, D, device="cuda", dtype=dtype)
    k = torch.randn(1, 2, 70, D, device="cuda", dtype=dtype)
    q[0, 1, 40, 0] = float("nan")
    out = forkattn.attention(q, k, k, backend="cuda")
    nan_rows = torch.isnan(out).any(-1)
    want = torch.zeros_like(nan_rows)
    want[0, 1, 40] = True
    _expect(torch.equal(nan_rows, want), f"{dtype} D={D}: a NaN query must give NaN in exactly its row")


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
                if dtype == torch.float16:  # the dropout instantiations (the mask's shuffles, the head per stage)
                    out = forkattn.attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=0.2, seed=D,
                                             backend="cuda")
                    out.float().sum().backward()
            check_garbage(dtype, D, D != 64, float("nan"))
        check_nan_query(dtype, 64)
    for garbage in (float("inf"), float("-inf")):
        check_garbage(torch.float16, 64, False, garbage)
    cu = torch.tensor([0, 5, 5, 135], dtype=torch.int32, device="cuda")
    q = torch.randn(135, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    kv = torch.randn(135, 2, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    forkattn.attention_varlen(q, kv, kv, cu, cu, 130, 130, causal=True, backend="cuda").float().sum().backward()
    forkattn.attention_varlen(q, kv, kv, cu, cu, 130, 130, causal=True, dropout_p=0.1, seed=-1,
                              backend="cuda").float().sum().backward()
    torch.cuda.synchronize()
    if FAILURES:
        print(f"sanitize_cuda_attention: {len(FAILURES)} wrong results")
        return 1
    print("sanitize_cuda_attention: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
