"""The backend registry (forkattn/backends/): capability declarations, resolve's order, cache and
errors, the CUDA preference setting, forkattn without its native extension, and no import cycle
inside the package."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import forkattn
from forkattn.backends import Backend, BackendUnavailableError, Call, OpFamily

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "python", "forkattn")


class _Toy(Backend):
    OP = "toy"
    SUPPORTED_DEVICES = ("cpu",)

    def make_impl(self):
        return self.NAME


class Fast(_Toy):
    NAME = "fast"
    PRIORITY = {"cpu": 200}
    SUPPORTED_DTYPES = (torch.float16,)
    HEAD_DIMS = (32, 64)
    FEATURES = frozenset({"causal"})


class Wide(_Toy):
    NAME = "wide"
    PRIORITY = {"cpu": 100}
    MAX_HEAD_DIM = 256
    FEATURES = frozenset({"causal", "gqa"})


class Named(_Toy):
    NAME = "named"  # no priority: runs only when named
    ENV_VARS = ("FORKATTN_TEST_TOY",)

    def available(self):
        return None if os.environ.get("FORKATTN_TEST_TOY") == "1" else "FORKATTN_TEST_TOY is not 1"


class Slow(_Toy):
    NAME = "slow"
    SUPPORTED_DEVICES = None
    FALLBACK = True


@pytest.fixture
def toy():
    fam = OpFamily("toy")
    for cls in (Slow, Fast, Wide, Named):
        fam.add(cls())
    return fam


def test_declared_capabilities_give_named_reasons():
    fast = Fast()
    assert fast.not_supported_reasons(Call("cpu", torch.float16, 64, ("causal",))) == []
    reasons = fast.not_supported_reasons(Call("cuda", torch.float32, 80, ("gqa",)))
    assert reasons == ["runs CPU tensors only, got cuda tensors", "runs float16 only, got torch.float32",
                       "head_dim must be 32 or 64, got 80", "gqa is not supported by backend 'fast'"]
    assert "head_dim must be at most 256, got 300" in Wide().supports(device_type="cpu", head_dim=300)


def test_resolve_order_features_and_errors(toy):
    assert toy.resolve(None, "cpu", torch.float16, 64).NAME == "fast"
    assert toy.resolve(None, "cpu", torch.float32, 64).NAME == "wide"  # fast: dtype
    assert toy.resolve(None, "cpu", torch.float16, 64, ("gqa",)).NAME == "wide"  # fast: feature
    assert toy.resolve(None, "cpu", torch.float32, 512).NAME == "slow"  # the fallback
    assert toy.resolve(None, "meta", torch.float16, 64).NAME == "slow"
    assert toy.preference == {"cpu": ["fast", "wide"]}
    assert toy.runnable("cpu", torch.float16, 64) == ["fast", "wide", "slow"]
    with pytest.raises(BackendUnavailableError, match=r"toy: backend 'fast' cannot run this call: .*head_dim must be 32 or 64"):
        toy.resolve("fast", "cpu", torch.float16, 128)
    with pytest.raises(ValueError, match=r"toy: unknown backend 'nope'; expected None or one of \['fast', 'named', 'slow', 'wide'\]"):
        toy.resolve("nope", "cpu")
    assert toy.impl("wide") == "wide"


def test_resolve_is_cached_and_follows_declared_env_vars(toy, monkeypatch):
    calls = []
    wide = toy.backends["wide"]
    real = wide.not_supported_reasons
    monkeypatch.setattr(wide, "not_supported_reasons", lambda call: calls.append(call) or real(call))
    for _ in range(3):
        assert toy.resolve(None, "cpu", torch.float32, 64).NAME == "wide"
    assert len(calls) == 1, "a repeated call must come from the cache"
    monkeypatch.delenv("FORKATTN_TEST_TOY", raising=False)
    with pytest.raises(BackendUnavailableError, match="FORKATTN_TEST_TOY is not 1"):
        toy.resolve("named", "cpu")
    monkeypatch.setenv("FORKATTN_TEST_TOY", "1")
    assert toy.resolve("named", "cpu").NAME == "named"
    monkeypatch.setenv("FORKATTN_TEST_TOY", "0")  # re-read on a cache hit: it is in named's ENV_VARS
    with pytest.raises(BackendUnavailableError, match="FORKATTN_TEST_TOY is not 1"):
        toy.resolve("named", "cpu")


def test_every_family_has_eager_and_one_class_per_backend():
    for op in ("attention", "attention_varlen", "decode_attention", "kv_append", "mlm_mask"):
        fam = forkattn.backends.get(op)
        assert list(fam.backends) == ["eager", "cpu", "cuda", "triton"], op
        assert all(b.OP == op and b.NAME == n for n, b in fam.backends.items())
        assert fam.backends["eager"].FALLBACK and fam.order("cpu")[-1].NAME == "eager"


def test_prefer_cuda_attention_setter(monkeypatch):
    monkeypatch.delenv("FORKATTN_PREFER_CUDA_ATTENTION", raising=False)
    try:
        forkattn.backends.prefer_cuda_attention(True)
        assert forkattn.backends.get("attention").preference["cuda"] == ["cuda", "triton"]
        assert forkattn.backends.get("attention_varlen").preference["cuda"] == ["cuda", "triton"]
        forkattn.backends.prefer_cuda_attention(None)
        assert forkattn.backends.get("attention").preference["cuda"] == ["triton"]
        monkeypatch.setenv("FORKATTN_PREFER_CUDA_ATTENTION", "1")  # read at call time
        assert forkattn.backends.get("attention").preference["cuda"] == ["cuda", "triton"]
        forkattn.backends.prefer_cuda_attention(False)
        assert forkattn.backends.get("attention").preference["cuda"] == ["triton"]
    finally:
        forkattn.backends.prefer_cuda_attention(None)
    assert forkattn.backends.get("decode_attention").preference["cuda"] == ["cuda", "triton"]


_NO_NATIVE = """
import sys
sys.path.insert(0, {path!r})
for name in {hidden!r}:
    sys.modules[name] = None  # import of it raises ImportError
import torch, forkattn
from forkattn import backends
q = torch.randn(1, 2, 5, 16, requires_grad=True)
out = forkattn.attention(q, q, q, causal=True)
out.sum().backward()
assert forkattn.select_backend(q) == "eager" and q.grad is not None
ids = torch.randint(5, 100, (2, 9))
assert forkattn.mlm_mask(ids, vocab_size=100, mask_token_id=3, seed=1)[0].shape == ids.shape
cache = forkattn.KVCache(1, 2, 8, 16, dtype=torch.float32, device="cpu")
cache.append(q.detach()[:, :, :3], q.detach()[:, :, :3])
assert forkattn.decode_attention(q.detach()[:, :, :1], cache).shape == (1, 2, 1, 16)
info = forkattn.build_info()
assert info["compiled"] == [] and "eager" in info["backends"] and "cpu" not in info["backends"], info
try:
    forkattn.attention(q, q, q, backend="cpu")
except forkattn.BackendUnavailableError as e:
    print("REASON", e)
"""


@pytest.mark.parametrize("hidden,reason", [
    (["forkattn._C"], "native extension failed to load"),
    (["forkattn._C", "forkattn._build_config"], "native extension is not built"),
])
def test_import_without_native_extension(hidden, reason):
    """No _C: import forkattn works, cpu/cuda are unavailable with the build error, eager runs."""
    code = _NO_NATIVE.format(path=os.path.join(ROOT, "python"), hidden=hidden)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"attention: backend 'cpu' cannot run this call: forkattn's {reason}" in res.stdout, res.stdout


def _import_graph():
    """forkattn module -> the forkattn modules it imports at module level or inside functions."""
    graph, paths = {}, {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), os.path.dirname(PKG))[:-3].split(os.sep)
                paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, f)
    modules = set(paths) | {"forkattn._C", "forkattn._build_config"}  # built by setup.py
    for mod, path in paths.items():
        is_pkg = path.endswith("__init__.py")
        here = mod.split(".") if is_pkg else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                base = here[:len(here) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                for a in node.names:  # `from . import x` imports the submodule x when there is one
                    deps.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycle_inside_the_package():
    graph = _import_graph()
    assert "forkattn.backends.registry" in graph and "forkattn._layout" in graph["forkattn.attention"]
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
