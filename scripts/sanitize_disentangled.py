"""A small run of the CUDA disentangled-attention kernels (kernels/disentangled/: forward and backward) for
compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.sh: every term subset, plain and
bucketed positions, Lq != Lk across the 64-row tiles, padding with an empty row and NaN keys, each
head_dim, and attention dropout (the DROPOUT instantiations: the eager backend draws the same
Philox mask for the seed) at head_dim 32 and 128. Outputs are compared with the eager backend
(loose: fp16 vs fp32 eager), so a kernel that writes nothing is noticed. Exits 0 without running when the cuda backend is unavailable."""
import sys

import torch

sys.path.insert(0, "python")
import forkattn  # noqa: E402

fam = forkattn.backends.get("disentangled_attention")
why = fam.why_not("cuda", "cuda", dtype=torch.float16, head_dim=64)
if why:
    print(f"disentangled: cuda backend unavailable ({why}), skipped")
    sys.exit(0)

failures = []
g = torch.Generator(device="cuda").manual_seed(0)
for D, (Lq, Lk), (c2p, p2c), (buckets, max_rel), dtype, drop in [
    (32, (7, 97), (True, True), (8, 20), torch.float16, 0.0),
    (64, (97, 7), (True, False), (-1, 5), torch.bfloat16, 0.0),
    (128, (65, 130), (False, True), (256, 512), torch.float16, 0.0),
    (64, (1, 64), (False, False), (-1, 8), torch.float16, 0.0),
    (32, (97, 130), (True, True), (8, 20), torch.float16, 0.2),  # dropout
    (128, (130, 65), (True, True), (-1, 5), torch.bfloat16, 0.3),  # dropout: dk/dv in four sweeps
]:
    span = buckets if buckets > 0 else max_rel
    q, k, v = (torch.randn(2, 3, L, D, device="cuda", dtype=dtype, generator=g) for L in (Lq, Lk, Lk))
    pk = torch.randn(3, 2 * span, D, device="cuda", dtype=dtype, generator=g) if c2p else None
    pq = torch.randn(1, 2 * span, D, device="cuda", dtype=dtype, generator=g) if p2c else None
    mask = torch.rand(2, Lk, device="cuda", generator=g) > 0.3
    mask[1] = False  # an empty row
    mask[0, 0] = True
    k = k.masked_fill(~mask[:, None, :, None], float("nan"))
    kw = dict(max_relative_positions=max_rel, position_buckets=buckets, key_padding_mask=mask, c2p=c2p, p2c=p2c,
              dropout_p=drop, seed=-77 + D)
    leaves = [None if t is None else t.detach().requires_grad_() for t in (q, k, v, pk, pq)]
    got = forkattn.disentangled_attention(*leaves, backend="cuda", **kw)
    f = [None if t is None else t.detach().float().requires_grad_() for t in (q, k, v, pk, pq)]
    want = forkattn.disentangled_attention(*f, backend="eager", **kw)
    want = want.masked_fill(~mask.any(1)[:, None, None, None], 0)  # forkattn's contract: empty rows give zeros
    err = (got.float() - want).abs().max().item()
    dout = torch.randn_like(want)
    used = [i for i, t in enumerate(leaves) if t is not None]
    g_got = torch.autograd.grad(got, [leaves[i] for i in used], dout.to(dtype))
    g_want = torch.autograd.grad(want, [f[i] for i in used], dout)
    pad = ~mask[:, None, :, None]
    g_want = [g.masked_fill(pad, 0) if i in (1, 2) else g for i, g in zip(used, g_want)]  # padded keys: 0 (eager: NaN)
    gerr = max(((a.float() - b) / (1 + b.abs().max())).abs().max().item() for a, b in zip(g_got, g_want))
    ok = err < 5e-2 and gerr < 5e-2 and not got.isnan().any()
    print(f"{'ok  ' if ok else 'FAIL'} D{D} Lq{Lq} Lk{Lk} c2p={c2p} p2c={p2c} buckets={buckets} {dtype} "
          f"dropout={drop}: max err {err:.2e}, grads (relative) {gerr:.2e}")
    if not ok:
        failures.append(D)
torch.cuda.synchronize()
sys.exit(1 if failures else 0)
