"""`python -m forkattn.bench`: every case runs for every implementation; per-family JSON/CSV written as
each case finishes; charts and report.md; --compare flags regressions beyond the noise; a family
that crashes or lacks an optional dependency does not lose the others' results."""
import csv
import glob
import json
import os
import sys
import time
import types

import pytest
import torch

from forkattn.bench import core, report, run


@pytest.fixture
def fast(monkeypatch):
    """Short timing budgets (the figures are not what these tests check) and no interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # interpreter timings mean nothing
    monkeypatch.setitem(core.BUDGETS, "quick", (0.01, 2, 4))
    monkeypatch.setitem(core.BUDGETS, "default", (0.01, 2, 4))


def _run_folder(out):
    (folder,) = glob.glob(os.path.join(out, "bench_cpu_*"))
    return folder


def test_quick_bench_runs_every_case(tmp_path, fast, capsys):
    assert run.main(["--quick", "--device", "cpu", "--only", "attention,mlm,decode", "--out", str(tmp_path)]) == 0
    folder = _run_folder(tmp_path)
    data = json.load(open(os.path.join(folder, "results.json")))
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["cpu"] == core.cpu_model() and env["cpu"] in env["device"]
    rows = data["rows"]
    errors = [r for r in rows if r.get("ms") is None]
    assert not errors, errors
    assert {r["family"] for r in rows} == {"attention", "mlm", "decode"}
    for r in rows:
        assert r["ms_q1"] <= r["ms"] <= r["ms_q3"] and r["samples"] >= 2 and r["spread"] >= 0
        if r["family"] == "attention":
            assert r["tflops"] > 0 and "vs_eager" in r and r["chart"] and r["panel"] in ("fwd", "fwd+bwd")
    assert {"eager", "sdpa", "forkattn-cpu"} <= {r["impl"] for r in rows if r["family"] == "attention"}
    with open(os.path.join(folder, "results.csv")) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for fam in ("attention", "mlm", "decode"):  # the per-family files hold that family's rows
        fam_rows = json.load(open(os.path.join(folder, f"{fam}.json")))["rows"]
        assert fam_rows == [r for r in rows if r["family"] == fam]
    md = open(os.path.join(folder, "report.md")).read()
    assert "## Summary" in md and "## attention" in md and "forkattn-cpu" in md
    out = capsys.readouterr().out
    assert "[1/" in out and "cases left" in out and "=== summary" in out and folder in out
    assert "TB/s" not in out.split("=== attention")[1].split("=== mlm")[0]  # no TB/s column for attention
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # charts are skipped with a one-line notice
        assert "charts skipped: matplotlib is not installed" in out
        return
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.png")))
    assert any(p.startswith("attention_float32_padded") for p in pngs), pngs
    assert any(p.startswith("attention_float32_causal") for p in pngs), pngs
    assert any(p.startswith("decode_") for p in pngs) and any(p.startswith("mlm_") for p in pngs)
    for p in pngs:
        assert open(os.path.join(folder, p), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({p})" in md


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        run.main(["--only", "nope", "--out", str(tmp_path)])


def test_attention_flops_count():
    assert core.attention_flops(1, 1, 4, 4, 2) == 4 * 4 * 4 * 2
    assert core.attention_flops(1, 1, 4, 4, 2, causal=True) == 2 * 4 * 4 * 2
    assert core.attention_flops(1, 1, 4, 4, 2, backward=True) == 3.5 * 4 * 4 * 4 * 2


def test_cpu_is_named_by_its_model():
    name = core.device_name(torch.device("cpu"))
    if os.path.exists("/proc/cpuinfo"):
        models = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        if models:
            assert name.startswith(models[0]) and "threads" in name


# ---------------------------------------------------------------- fake families

def _sleeper(seconds):
    return lambda: time.sleep(seconds)


def _family(monkeypatch, name, cases_fn, **attrs):
    mod = types.ModuleType(f"fakebench_{name}")
    mod.cases = cases_fn
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return core.Family(name, mod.__name__, f"fake family {name}")


def _sleep_cases(family, fast_s, slow_s):
    def cases(device, size):
        return [core.Case(family, f"{family} case {i}", setup=lambda: {"eager": _sleeper(slow_s), "forkattn-x": _sleeper(fast_s)},
                          bytes=1e6, chart="c", x=f"x{i}", xlabel="x") for i in range(2)]
    return cases


def test_failing_family_keeps_the_others(tmp_path, fast, monkeypatch, capsys):
    seen = {}

    def broken_cases(device, size):
        def setup():
            # the earlier family's rows are on disk before this one runs
            seen["good"] = glob.glob(os.path.join(tmp_path, "*", "good.json"))
            raise RuntimeError("kernel exploded\nsecond line of the message")
        return [core.Case("broken", "breaks", setup=setup),
                core.Case("broken", "works", setup=lambda: {"eager": _sleeper(0.001)})]

    fams = [_family(monkeypatch, "good", _sleep_cases("good", 0.001, 0.002)),
            _family(monkeypatch, "broken", broken_cases),
            _family(monkeypatch, "crashlist", lambda device, size: 1 / 0),
            _family(monkeypatch, "after", _sleep_cases("after", 0.001, 0.002))]
    monkeypatch.setattr(core, "FAMILIES", fams)
    rc = run.main(["--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    assert rc == 1  # two families crashed
    assert seen["good"], "good.json was not written before the next family ran"
    folder = _run_folder(tmp_path)
    data = json.load(open(os.path.join(folder, "results.json")))
    by_fam = {}
    for r in data["rows"]:
        by_fam.setdefault(r["family"], []).append(r)
    assert len(by_fam["good"]) == 4 and len(by_fam["after"]) == 4
    assert [r["case"] for r in by_fam["broken"]] == ["breaks", "works"] and by_fam["broken"][1]["ms"] > 0
    assert data["status"]["good"] == "ok" and data["status"]["after"] == "ok"
    assert data["status"]["broken"].startswith("failed") and "kernel exploded" in data["status"]["broken"]
    assert data["status"]["crashlist"].startswith("failed: ZeroDivisionError")
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: kernel exploded" in out and "second line" not in out
    assert not glob.glob(os.path.join(folder, "*.png"))  # --no-plot


def test_missing_optional_dependency_is_a_notice(tmp_path, fast, monkeypatch, capsys):
    def needs_import(device, size):
        import forkattn_no_such_module  # noqa: F401

    fams = [_family(monkeypatch, "needy", _sleep_cases("needy", 0.001, 0.002), REQUIRES=("forkattn_no_such_dep",)),
            _family(monkeypatch, "lazy", needs_import),
            _family(monkeypatch, "good", _sleep_cases("good", 0.001, 0.002))]
    monkeypatch.setattr(core, "FAMILIES", fams)
    assert run.main(["--device", "cpu", "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "needy: skipped, needs forkattn_no_such_dep (pip install forkattn_no_such_dep)" in out
    assert "lazy: skipped, needs forkattn_no_such_module" in out
    data = json.load(open(os.path.join(_run_folder(tmp_path), "results.json")))
    assert {r["family"] for r in data["rows"]} == {"good"}


def test_older_family_protocol_still_runs(tmp_path, fast, monkeypatch):
    """cases(device, quick) returning Cases with their callables filled in (the form before sizes)."""
    got = {}

    def cases(device, quick):
        got["quick"] = quick
        return [core.Case("old", "one", {"eager": _sleeper(0.001), "forkattn-x": _sleeper(0.0005)})]

    monkeypatch.setattr(core, "FAMILIES", [_family(monkeypatch, "old", cases)])
    assert run.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-plot"]) == 0
    assert got["quick"] is True


def test_compare_flags_a_planted_regression(tmp_path, fast, monkeypatch, capsys):
    monkeypatch.setitem(core.BUDGETS, "default", (0.05, 7, 30))  # steady medians
    monkeypatch.setattr(core, "FAMILIES", [_family(monkeypatch, "fam", _sleep_cases("fam", 0.001, 0.003))])
    assert run.main(["--device", "cpu", "--out", str(tmp_path / "a"), "--no-plot"]) == 0
    before = os.path.join(_run_folder(tmp_path / "a"))
    # now forkattn-x is 30x slower in case 1 only: the planted regression
    def cases(device, size):
        return [core.Case("fam", f"fam case {i}", setup=lambda i=i: {"eager": _sleeper(0.003),
                                                                      "forkattn-x": _sleeper(0.03 if i else 0.001)},
                          bytes=1e6, chart="c", x=f"x{i}") for i in range(2)]
    monkeypatch.setattr(core, "FAMILIES", [_family(monkeypatch, "fam", cases)])
    capsys.readouterr()
    assert run.main(["--device", "cpu", "--out", str(tmp_path / "b"), "--no-plot", "--compare", before]) == 0
    out = capsys.readouterr().out
    flagged = [ln for ln in out.splitlines() if ln.rstrip().endswith("REGRESSION")]
    assert len(flagged) == 1 and "fam case 1" in flagged[0] and "forkattn-x" in flagged[0], out
    assert "1 regressions" in out
    md = open(os.path.join(_run_folder(tmp_path / "b"), "report.md")).read()
    assert "## Compared with" in md and "REGRESSION" in md


def test_compare_noise_comes_from_both_spreads():
    def row(ms, spread, impl="forkattn-x"):
        return {"family": "f", "case": "c", "impl": impl, "ms": ms, "spread": spread}

    prev = {"environment": {}, "rows": [row(10.0, 0.05)]}
    assert report.compare(prev, [row(13.0, 0.05)])["rows"][0]["flag"] == "REGRESSION"  # 30% > 5% + 5%
    assert report.compare(prev, [row(13.0, 0.30)])["rows"][0]["flag"] == ""  # 30% < 5% + 30%
    assert report.compare(prev, [row(7.0, 0.05)])["rows"][0]["flag"] == "faster"
    assert report.compare(prev, [row(10.3, 0.0)])["rows"][0]["flag"] == ""  # under the 5% floor
    comp = report.compare(prev, [row(10.0, 0.0, impl="other")])
    assert comp["rows"] == [] and comp["only_new"] == 1 and comp["only_old"] == 1


def test_timing_is_round_robin_with_a_spread():
    calls = []
    fns = {n: (lambda n=n: calls.append(n) or time.sleep(0.002)) for n in ("a", "b", "c")}
    res = core.time_interleaved(fns, budget_s=0.0, min_rounds=4, max_rounds=4)
    timed = calls[6:]  # after a warm-up and a calibration call each
    assert len(timed) == 12
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round times each once
    assert len({r[0] for r in rounds}) == 3  # the order rotates
    for t in res.values():
        assert t.samples == 4 and t.q1 <= t.median <= t.q3 and t.median >= 0.002
    err = core.time_interleaved({"ok": lambda: None, "bad": lambda: 1 / 0}, budget_s=0.0, min_rounds=2, max_rounds=2)
    assert isinstance(err["bad"], ZeroDivisionError) and err["ok"].samples == 2


def test_loaded_machine_is_reported(tmp_path, fast, monkeypatch, capsys):
    monkeypatch.setattr(core, "loadavg", lambda: 64.0)
    noisy = iter([0.001, 0.02] * 1000)  # alternating sample times: IQR far above 20%, even under load
    monkeypatch.setattr(core, "FAMILIES", [_family(monkeypatch, "fam", lambda device, size: [
        core.Case("fam", "c", setup=lambda: {"eager": lambda: time.sleep(next(noisy))})])])
    assert run.main(["--device", "cpu", "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "the machine is loaded (1-minute load average 64.0" in out
    assert "rows have a spread (IQR/median) above 20%" in out


def test_table_columns_stay_aligned_and_meaningful():
    rows = [{"impl": "eager", "ms": 12.0, "spread": 0.01, "samples": 5, "tflops": 0.5, "vs_eager": 1.0,
             "eager_impl": "eager"},
            {"impl": "forkattn-a-very-long-backend-name-padded", "ms": 1234.5, "spread": 0.3, "samples": 5,
             "tflops": 0.004, "vs_eager": 0.01, "eager_impl": "eager"},
            {"impl": "broken", "ms": None, "error": "RuntimeError: no"}]
    text = report.case_table(rows).splitlines()
    header, a, b = text[:3]
    assert "TB/s" not in header and "tok/s" not in header and "GFLOP/s" in header  # all below 1 TFLOP/s
    assert len(a) == len(b) == len(header)  # right-aligned columns end together
    assert header.index(" ms") + 3 == a.index("12.00") + 5 == b.index("1234") + 4 and "30%!" in b  # noisy row marked
    assert text[3].strip() == "broken: RuntimeError: no"


def test_legend_matches_implementations():
    mod = types.SimpleNamespace(IMPLS={"hf-eager": "transformers eager", "forkattn-*-padded": "padded",
                                       "forkattn-*": "ours", "unused": "x"})
    assert list(core.legend(mod, ["hf-eager", "forkattn-cpu-padded"])) == ["hf-eager", "forkattn-*-padded", "forkattn-*"]


def test_each_case_runs_on_its_own_batch(monkeypatch):
    """Every timed callable of the BERT and GPT cases works on its case's shapes (closures built
    in a loop once all read the last iteration's batch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("transformers")
    from forkattn.bench import bert, gpt

    monkeypatch.setattr(bert, "SMALL", dict(bert.SMALL, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=48, vocab_size=1100))
    cases = bert.cases(torch.device("cpu"), "quick")
    assert len({c.params["B"] for c in cases}) > 1  # the shapes differ, so a mix-up shows
    for case in cases:
        B, L = case.params["B"], case.params["L"]
        fns = case.callables()
        assert {"hf-eager", "hf-sdpa", "forkattn-cpu", "forkattn-cpu-padded", "forkattn-eager"} <= set(fns)
        assert (case.eager, case.sdpa) == ("hf-eager", "hf-sdpa") and case.tokens == B * L
        for name, fn in fns.items():
            out = fn()
            if case.params["mode"] == "inference":
                assert out.shape == (B, L, 32), (case.name, name, out.shape)
            else:
                assert out.dim() == 0 and torch.isfinite(out), (case.name, name)
    gen = [c for c in gpt.cases(torch.device("cpu"), "quick") if "generate" in c.name]
    assert [c.params["batch"] for c in gen] == [1, 32]
    for case in gen:
        fns = case.callables()
        assert {"forkattn-eager", "hf-eager", "hf-sdpa", "forkattn-cpu"} <= set(fns)
        for name, fn in fns.items():
            out = fn()
            assert out.shape == (case.params["batch"], case.params["prompt"] + case.params["new_tokens"]), (case.name, name)


def test_attention_dropout_rows(monkeypatch):
    """Issue #16's rows: a "fwd+bwd, dropout 0.1" case after the plain one at BERT-base L512 and
    GPT-2 L1024 (not in the quick set); every row drops with p (forkattn's rows the reference's
    Philox mask for the bench's seed), and "p=0: forkattn-cpu" does not."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from forkattn import reference
    from forkattn.bench import attention
    _bind, _impls = attention._bind, attention._impls

    assert not [c for c in attention.cases(torch.device("cpu"), "quick") if c.params["dropout_p"]]
    cases = attention.cases(torch.device("cpu"), "default")
    drop = [(i, c) for i, c in enumerate(cases) if c.params["dropout_p"]]
    assert [(c.params["L"], c.params["causal"], c.params["padded"]) for _, c in drop] == [(512, False, True),
                                                                                           (1024, True, False)]
    for i, c in drop:
        prev = cases[i - 1]
        assert c.params["pass"] == "fwd+bwd" and c.params["dropout_p"] == attention.DROPOUT_P
        assert prev.params == dict(c.params, dropout_p=0.0) and c.name == prev.name + ", dropout 0.1"
        assert c.chart == prev.chart and c.panel == "fwd+bwd, dropout 0.1" and c.flops == prev.flops
    # a small shape through the same setup: outputs (the "fwd" pass) and gradients
    for causal, padded in ((False, True), (True, False)):
        captured = {}  # the tensors and mask _setup builds, to run the reference on them
        monkeypatch.setattr(attention, "_bind", lambda impls, q, k, v: (captured.update(qkv=(q, k, v)),
                                                                         _bind(impls, q, k, v))[1])
        monkeypatch.setattr(attention, "_impls", lambda mask, *a: (captured.update(mask=mask), _impls(mask, *a))[1])
        fwd = attention._setup(2, 3, 37, 16, torch.float32, causal, padded, torch.device("cpu"), 5, "fwd", 0.1)()
        assert {"eager", "sdpa", "forkattn-cpu", "p=0: forkattn-cpu"} <= set(fwd)
        out = {name: fn() for name, fn in fwd.items()}
        plain = attention._setup(2, 3, 37, 16, torch.float32, causal, padded, torch.device("cpu"), 5, "fwd")()
        base = plain["forkattn-cpu"]()
        torch.testing.assert_close(out["p=0: forkattn-cpu"], base)
        torch.testing.assert_close(plain["eager"](), base, rtol=1e-5, atol=1e-5)
        (q, k, v), mask = captured["qkv"], captured["mask"]
        assert (mask is not None) == padded
        ref = reference.attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=0.1,
                                  seed=attention.DROPOUT_SEED)
        torch.testing.assert_close(out["forkattn-cpu"], ref, rtol=1e-5, atol=1e-5)
        for name in ("eager", "sdpa", "forkattn-cpu"):
            assert (out[name] - base).abs().max() > 1e-3, name  # it drops
        grads = attention._setup(2, 3, 37, 16, torch.float32, causal, padded, torch.device("cpu"), 5, "fwd+bwd", 0.1)()
        for name, fn in grads.items():
            assert all(torch.isfinite(g).all() for g in fn()), name
