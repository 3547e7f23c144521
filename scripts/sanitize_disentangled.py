"""A small run of the CUDA disentangled-attention forward (kernels/disentangled/) for
compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.sh: every term subset, plain and
bucketed positions, Lq != Lk across the 64-row tiles, padding with an empty row and NaN keys, each
head_dim. Outputs are compared with the eager backend (loose: fp16 vs fp32 eager), so a kernel
that writes nothing is noticed. Exits 0 without running when the cuda backend is unavailable."""
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
for D, (Lq, Lk), (c2p, p2c), (buckets, max_rel), dtype in [
    (32, (7, 97), (True, True), (8, 20), torch.float16),
    (64, (97, 7), (True, False), (-1, 5), torch.bfloat16),
    (128, (65, 130), (False, True), (256, 512), torch.float16),
    (64, (1, 64), (False, False), (-1, 8), torch.float16),
]:
    span = buckets if buckets > 0 else max_rel
    q, k, v = (torch.randn(2, 3, L, D, device="cuda", dtype=dtype, generator=g) for L in (Lq, Lk, Lk))
    pk = torch.randn(3, 2 * span, D, device="cuda", dtype=dtype, generator=g) if c2p else None
    pq = torch.randn(1, 2 * span, D, device="cuda", dtype=dtype, generator=g) if p2c else None
    mask = torch.rand(2, Lk, device="cuda", generator=g) > 0.3
    mask[1] = False  # an empty row
    mask[0, 0] = True
    k = k.masked_fill(~mask[:, None, :, None], float("nan"))
    kw = dict(max_relative_positions=max_rel, position_buckets=buckets, key_padding_mask=mask, c2p=c2p, p2c=p2c)
    got = forkattn.disentangled_attention(q, k, v, pk, pq, backend="cuda", **kw)
    f = [None if t is None else t.float() for t in (q, k, v, pk, pq)]
    want = forkattn.disentangled_attention(*f, backend="eager", **kw)
    want[1] = 0  # forkattn's contract: an empty row gives zeros
    err = (got.float() - want).abs().max().item()
    ok = err < 5e-2 and not got.isnan().any()
    print(f"{'ok  ' if ok else 'FAIL'} D{D} Lq{Lq} Lk{Lk} c2p={c2p} p2c={p2c} buckets={buckets} {dtype}: max err {err:.2e}")
    if not ok:
        failures.append(D)
torch.cuda.synchronize()
sys.exit(1 if failures else 0)
