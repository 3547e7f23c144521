"""A small run of the CUDA MLM sampler and the CUDA KV-cache kernels (append, split-KV decode),
paged and contiguous, for compute-sanitizer (memcheck, racecheck) in scripts/gpu_check.sh.
Results are compared with the CPU/eager backends so a kernel that writes nothing is noticed.
Also the no-check path with block-table entries outside the page pool (cuda and triton kernels):
the pools are views into guard buffers, so a read of the page just past the pool would change
the output and a write there would change the guard, on top of what memcheck sees for entries far
outside any allocation. Exits 0 without running the parts whose backend is unavailable."""
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



def out_of_pool():
    """check=False (the kernels alone): entries >= num_pages must be skipped by append and decode."""
    for backend in ("cuda", "triton"):
        why = forkattn.backends.get("decode_attention").why_not(backend, "cuda", dtype=torch.float16, head_dim=64)
        if why:
            print(f"out-of-pool {backend}: unavailable ({why}), skipped")
            continue
        for value in (None, "next", 10**6, 2**31 - 1):
            B, Hkv, S, D, P, GUARD = 3, 2, 200, 64, 16, 4
            cache = forkattn.KVCache(B, Hkv, S, D, dtype=torch.float16, device="cuda", page_size=P, check=False)
            N = cache.num_pages
            guards = []
            for name in ("k_cache", "v_cache"):  # the pool in the middle of a guard buffer of 1e4s
                g = torch.full((N + 2 * GUARD, Hkv, P, D), 1e4, dtype=torch.float16, device="cuda")
                g[GUARD:GUARD + N].normal_()
                setattr(cache, name, g[GUARD:GUARD + N])
                guards.append(g)
            k, v = (torch.randn(B, Hkv, 40, D, device="cuda", dtype=torch.float16) for _ in range(2))
            cache.append(k, v, backend=backend)
            bad = N if value == "next" else value
            if bad is not None:
                cache.block_table[1, 1] = bad  # holds tokens 16..31 of sequence 1, and no token yet of 2
                cache.block_table[2, 3] = bad  # tokens 48.. of sequence 2: the append below reaches it
            k, v = (torch.randn(B, Hkv, 9, D, device="cuda", dtype=torch.float16) for _ in range(2))
            cache.append(k, v, backend=backend)
            want_lens = [49, 49, 48] if bad is not None else [49, 49, 49]
            expect(f"out-of-pool {backend} entry={bad}: append stops before the bad page",
                   cache.seqlens.tolist() == want_lens)
            q = torch.randn(B, 4, 1, D, device="cuda", dtype=torch.float16)
            cache.plan(4, 1, backend, num_splits=3)  # the split + merge path too
            got = forkattn.decode_attention(q, cache, backend=backend)
            want = forkattn.decode_attention(q, cache, backend="eager")  # skips the same pages
            err = (got.float() - want.float()).abs().max().item()
            expect(f"out-of-pool {backend} entry={bad}: decode == eager (max err {err:.1e})", err < 2e-2)
            for g in guards:
                torch.cuda.synchronize()
                intact = bool((g[:GUARD] == 1e4).all()) and bool((g[GUARD + N:] == 1e4).all())
                expect(f"out-of-pool {backend} entry={bad}: guard pages untouched", intact)


mlm()
decode()
out_of_pool()
torch.cuda.synchronize()
sys.exit(1 if failures else 0)
