"""A small run of the CUDA MLM sampler and the CUDA KV-cache kernels (append, split-KV decode),
paged and contiguous, for compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.sh.
Results are compared with the CPU/eager backends so a kernel that writes nothing is noticed.
Exits 0 without running the parts whose cuda backend is unavailable."""
import sys

import torch

sys.path.insert(0, "python")
import forkattn  # noqa: E402

failures = []


def expect(name, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    if not ok:
        failures.append(name)


def mlm():
    if forkattn.backends.get("mlm_mask").why_not("cuda", "cuda", dtype=torch.int64):
        print("mlm: cuda backend unavailable, skipped")
        return
    ids = torch.randint(1000, 30000, (37, 129), device="cuda")
    ids[:, 0] = 101
    am = (torch.arange(129, device="cuda")[None] < torch.randint(1, 130, (37, 1), device="cuda")).long()
    words = (torch.arange(129, device="cuda") // 3).expand(37, 129).contiguous()
    kw = dict(vocab_size=30522, mask_token_id=103, special_token_ids=[0, 101, 102, 103], attention_mask=am, seed=7)
    for extra in ({}, {"mode": "exact"}, {"word_ids": words, "min_masked": 1}):
        got = forkattn.mlm_mask(ids, backend="cuda", **kw, **extra)
        want = forkattn.mlm_mask(ids.cpu(), backend="cpu", **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                            for k, v in {**kw, **extra}.items()})
        expect(f"mlm cuda == cpu {extra and list(extra)}", all(torch.equal(a.cpu(), b) for a, b in zip(got, want)))


def decode():
    reg = forkattn.backends.get("decode_attention")
    if reg.why_not("cuda", "cuda", dtype=torch.float16, head_dim=64):
        print("decode: cuda backend unavailable, skipped")
        return
    for paged in (False, True):
        kw = dict(page_size=16, num_pages=3 * 19) if paged else {}
        cache = forkattn.KVCache(3, 2, 300, 64, dtype=torch.float16, device="cuda", **kw)
        k, v = (torch.randn(3, 2, 100, 64, device="cuda", dtype=torch.float16) for _ in range(2))
        cache.append(k, v, backend="cuda")
        cache.reset(1)
        for T in (7, 1, 3):
            k, v = (torch.randn(3, 2, T, 64, device="cuda", dtype=torch.float16) for _ in range(2))
            cache.append(k, v, backend="cuda")
            q = torch.randn(3, 4, T, 64, device="cuda", dtype=torch.float16)
            got = forkattn.decode_attention(q, cache, backend="cuda")
            want = forkattn.decode_attention(q, cache, backend="eager")
            err = (got.float() - want.float()).abs().max().item()
            expect(f"decode cuda paged={paged} T={T}: max err {err:.1e}", err < 2e-2)


mlm()
decode()
torch.cuda.synchronize()
sys.exit(1 if failures else 0)
