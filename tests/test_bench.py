"""`python -m forkattn.bench --quick` on CPU: every case runs for every implementation, and the
JSON/CSV files carry the device, versions and figures."""
import csv
import glob
import json
import os

import pytest
import torch

from forkattn.bench import core


def test_quick_bench_runs_every_case(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # interpreter timings mean nothing
    assert core.main(["--quick", "--device", "cpu", "--only", "attention,mlm,decode", "--out", str(tmp_path)]) == 0
    (js,) = glob.glob(os.path.join(tmp_path, "*.json"))
    (cs,) = glob.glob(os.path.join(tmp_path, "*.csv"))
    data = json.load(open(js))
    assert data["environment"]["device"].startswith("CPU") and data["environment"]["torch"] == torch.__version__
    rows = data["rows"]
    errors = [r for r in rows if r.get("ms") is None]
    assert not errors, errors
    fams = {r["family"] for r in rows}
    assert fams == {"attention", "mlm", "decode"}
    for r in rows:
        if r["family"] == "attention":
            assert r["tflops"] > 0 and "vs_eager" in r
    impls = {r["impl"] for r in rows if r["family"] == "attention"}
    assert {"eager", "sdpa", "forkattn-cpu"} <= impls
    with open(cs) as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        core.main(["--only", "nope", "--out", str(tmp_path)])


def test_attention_flops_count():
    assert core.attention_flops(1, 1, 4, 4, 2) == 4 * 4 * 4 * 2
    assert core.attention_flops(1, 1, 4, 4, 2, causal=True) == 2 * 4 * 4 * 2
    assert core.attention_flops(1, 1, 4, 4, 2, backward=True) == 3.5 * 4 * 4 * 4 * 2


def test_each_case_runs_on_its_own_batch(monkeypatch):
    """Every timed callable of the BERT and GPT cases works on its case's shapes (closures built
    in a loop once all read the last iteration's batch)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from forkattn.bench import bert, gpt

    monkeypatch.setitem(bert.BASE, "hidden_size", 32)
    monkeypatch.setitem(bert.BASE, "num_hidden_layers", 1)
    monkeypatch.setitem(bert.BASE, "num_attention_heads", 2)
    monkeypatch.setitem(bert.BASE, "intermediate_size", 48)
    monkeypatch.setitem(bert.BASE, "vocab_size", 1100)
    cases = bert.cases(torch.device("cpu"), quick=True)
    assert len({c.params["B"] for c in cases}) > 1  # the shapes differ, so a mix-up shows
    for case in cases:
        B, L = case.params["B"], case.params["L"]
        assert {"eager", "sdpa", "forkattn-cpu", "forkattn-cpu-padded"} <= set(case.fns)
        for name, fn in case.fns.items():
            out = fn()
            if case.params["mode"] == "inference":
                assert out.shape == (B, L, 32), (case.name, name, out.shape)
            else:
                assert out.dim() == 0 and torch.isfinite(out), (case.name, name)
    gen = [c for c in gpt.cases(torch.device("cpu"), quick=True) if "generate" in c.name]
    assert [c.params["batch"] for c in gen] == [1, 32]
    for case in gen:
        for name, fn in case.fns.items():
            out = fn()
            assert out.shape == (case.params["batch"], case.params["prompt"] + case.params["new_tokens"]), (case.name, name)
