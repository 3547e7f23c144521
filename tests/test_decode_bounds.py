"""KV-cache state a user can corrupt: block-table entries outside the page pool, negative lengths
in cache.seqlens, a cache on the meta device. Crash-prone cases (an out-of-pool page used to be
dereferenced: SIGSEGV, heap corruption) run in a child process (tests/decode_bounds_cases.py), so
a crash fails the test instead of killing pytest."""
import os
import subprocess
import sys

import pytest
import torch

from forkattn import KVCache, KVCacheOverflowError, decode_attention, reference

HERE = os.path.dirname(os.path.abspath(__file__))


def _triton_reason():
    from forkattn.triton import unavailable_reason

    return unavailable_reason()


TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    _triton_reason() is not None, reason=f"triton backend unavailable: {_triton_reason()}"))


@pytest.mark.parametrize("which", ["cpu direct eager", TRITON])  # one child each (an import is seconds)
def test_out_of_pool_block_table_entry(which):
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "decode_bounds_cases.py"), *which.split()], env=env,
                       capture_output=True, text=True, timeout=600)
    log = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"exit {r.returncode} (negative: killed by that signal)\n{log}"
    for name in which.split():  # 4 values x (decode, append) x check, + the repro; 4 values direct
        want = 4 if name == "direct" else 4 * 2 * 2 + 1
        assert f"done {name} {want}" in r.stdout, log


@pytest.mark.gpu
def test_out_of_pool_block_table_entry_gpu():
    # the cuda and triton kernels alone (check=False) must skip the page; a fault would poison the
    # CUDA context of the whole test run, hence the child process here too
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "FORKATTN_BOUNDS_DEVICE": "cuda"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "decode_bounds_cases.py"), "cuda", "triton", "eager"],
                       env=env, capture_output=True, text=True, timeout=600)
    log = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"exit {r.returncode}\n{log}"
    for name in ("cuda", "triton", "eager"):
        assert f"done {name} {4 * 2 * 2 + 1}" in r.stdout, log


# --- negative lengths -----------------------------------------------------------------------------------

BACKENDS = ["cpu", "eager", TRITON]


def _cache_with_negative_length(check):
    cache = KVCache(3, 2, 16, 32, dtype=torch.float32, device="cpu", page_size=4, check=check)
    k = torch.randn(3, 2, 5, 32)
    cache.append(k, k, backend="eager")
    cache.seqlens[1] = -3
    return cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_seqlens_refused_with_check(backend):
    cache = _cache_with_negative_length(True)
    before = [t.clone() for t in (cache.k_cache, cache.v_cache, cache.seqlens)]
    k = torch.randn(3, 2, 2, 32)
    with pytest.raises(ValueError, match=r"seqlens\[1\] = -3 .*negative.*nothing was written"):
        cache.append(k, k, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((cache.k_cache, cache.v_cache, cache.seqlens), before))
    with pytest.raises(ValueError, match=r"seqlens\[1\] = -3"):
        decode_attention(torch.randn(3, 4, 1, 32), cache, backend=backend)


@pytest.mark.parametrize("backend", ["eager", TRITON])
def test_negative_seqlens_without_check_write_nothing(backend):
    # check=False on the GPU-capable backends: no sync, no error; the sequence with a negative length
    # gets nothing written, and its decode rows see no key (zeros); the others are unaffected
    cache = _cache_with_negative_length(False)
    before_k = cache.k_cache.clone()
    k = torch.randn(3, 2, 2, 32)
    cache.append(k, k, backend=backend)
    assert cache.seqlens.tolist() == [7, -3, 7]
    changed = (cache.k_cache != before_k).any(dim=-1)  # [pages, Hkv, P]
    assert int(changed.sum()) == 2 * 2 * 2  # 2 sequences x 2 heads x 2 tokens
    for b in (0, 2):
        for t in range(2):
            page = int(cache.block_table[b, (5 + t) // 4])
            assert torch.equal(cache.k_cache[page, :, (5 + t) % 4], k[b, :, t])
    out = decode_attention(torch.randn(3, 4, 1, 32), cache, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and not out.isnan().any()


def test_negative_seqlens_cpu_entry_points_refuse():
    # the cpu backend (and the _C entry points) check lengths on their own, as they do block_table
    from forkattn._native import _C

    cache = _cache_with_negative_length(False)
    k = torch.randn(3, 2, 2, 32)
    before = cache.k_cache.clone()
    with pytest.raises(ValueError, match=r"seqlens\[1\] = -3"):
        cache.append(k, k, backend="cpu")
    with pytest.raises(ValueError, match=r"seqlens\[1\] = -3"):
        _C.kv_append_cpu(cache.k_cache, cache.v_cache, cache.seqlens, cache.block_table, k, k, 16)
    with pytest.raises(ValueError, match=r"seqlens\[1\] = -3"):
        _C.decode_attention_cpu(torch.randn(3, 4, 1, 32), cache.k_cache, cache.v_cache, cache.seqlens,
                                cache.block_table, torch.empty(0), torch.empty(0), 16, 1, 0.2)
    assert torch.equal(cache.k_cache, before) and cache.seqlens.tolist() == [5, -3, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_still_reported_next_to_the_new_checks(backend):
    cache = KVCache(2, 1, 8, 32, dtype=torch.float32, device="cpu", page_size=4)
    k = torch.randn(2, 1, 7, 32)
    cache.append(k, k, backend=backend)
    with pytest.raises(KVCacheOverflowError, match=r"overflow sequences \[0, 1\]"):
        cache.append(k[:, :, :2], k[:, :, :2], backend=backend)


# --- the meta device ---------------------------------------------------------------------------------------

def test_meta_device_refused_at_construction():
    with pytest.raises(ValueError, match=r"device must be a real device.*got meta"):
        KVCache(2, 1, 8, 32, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match=r"device must be a real device.*got meta"):
        KVCache(2, 1, 8, 32, dtype=torch.float32, device=torch.device("meta"), page_size=4)


# --- the eager reference skips what the kernels skip --------------------------------------------------------

def test_eager_decode_ignores_missing_pages_and_unused_slots():
    # a missing page (-1) inside a sequence contributes nothing (the kernels skip it; the eager
    # gather used to read page 0 instead), and NaN in slots past a sequence's length is never used
    cache = KVCache(2, 1, 12, 32, dtype=torch.float32, device="cpu", page_size=4, check=False)
    k = torch.randn(2, 1, 9, 32)
    cache.append(k, k, backend="eager")
    cache.seqlens[1] = 6
    cache.block_table[0, 1] = -1
    used = {(int(cache.block_table[0, 0]), s) for s in range(4)} | {(int(cache.block_table[0, 2]), 0)}
    used |= {(int(cache.block_table[1, j // 4]), j % 4) for j in range(6)}
    for page in range(cache.num_pages):
        for s in range(4):
            if (page, s) not in used:
                cache.k_cache[page, :, s] = float("nan")
                cache.v_cache[page, :, s] = float("nan")
    q = torch.randn(2, 1, 1, 32)
    got = {b: decode_attention(q, cache, backend=b) for b in ("eager", "cpu")}
    keep0 = [0, 1, 2, 3, 8]
    want0 = reference.attention(q[:1].double(), k[:1, :, keep0].double(), k[:1, :, keep0].double())
    want1 = reference.attention(q[1:].double(), k[1:, :, :6].double(), k[1:, :, :6].double())
    want = torch.cat([want0, want1])
    for name, out in got.items():
        assert not out.isnan().any(), name
        assert (out.double() - want).abs().max() < 1e-5, name
