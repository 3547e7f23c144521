"""The bert family's peer rows (issue #18): ONNX Runtime on the exported model, plain and optimized,
and torch.compile of transformers' sdpa model; each checked against transformers eager before it is
timed, left out with a notice when it cannot run or does not match."""
import time

import pytest
import torch

from forkattn.bench import core, ort

pytest.importorskip("transformers")


class _Every:
    def __contains__(self, item):
        return True


@pytest.fixture
def tiny_bert(monkeypatch):
    """bert's quick set cut to one tiny inference case that gets the peer rows."""
    from forkattn.bench import bert

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(bert, "SMALL", dict(bert.SMALL, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=48, vocab_size=1100))
    monkeypatch.setitem(bert.SHAPES["cpu"], "quick", ([(3, 24)], []))
    monkeypatch.setitem(bert.PEER_SHAPES, "quick", _Every())
    core.NOTICES.clear()
    return bert


def _case(bert):
    (case,) = bert.cases(torch.device("cpu"), "quick")
    return case


def test_peer_rows_run_and_match_eager(tiny_bert):
    if ort.ort_missing():
        pytest.skip(f"ORT rows not tested: {ort.ort_missing()}")
    case = _case(tiny_bert)
    assert case.pause_s == ort.PAUSE_S
    fns = case.callables()
    assert {"ort", "ort-opt", "hf-sdpa-compile", "hf-eager", "forkattn-cpu"} <= set(fns), (set(fns), core.NOTICES)
    ref = fns["hf-eager"]()
    for name in ("ort", "ort-opt", "hf-sdpa-compile"):
        out = fns[name]()
        assert out.shape == (3, 24, 32) and ort.max_abs_diff(out, ref) < 1e-4, name
    assert any("max |out - hf-eager|" in n and "ort-opt" in n for n in core.NOTICES), core.NOTICES
    res = core.time_case(fns, torch.device("cpu"), "quick", pause_s=case.pause_s)
    assert all(isinstance(res[n], core.Timing) for n in ("ort", "ort-opt", "hf-sdpa-compile")), res


def test_without_onnxruntime_the_rows_are_absent_with_a_reason(tiny_bert, monkeypatch):
    monkeypatch.setattr(ort, "ort_missing", lambda: "onnxruntime is not installed (pip install 'forkattn[ort]')")

    def no_compile(model):
        raise RuntimeError("inductor needs a C++ compiler")
    monkeypatch.setattr(ort, "compiled", no_compile)
    case = _case(tiny_bert)
    assert case.pause_s == 0.0
    fns = case.callables()
    assert not {"ort", "ort-opt", "hf-sdpa-compile"} & set(fns) and {"hf-eager", "hf-sdpa"} <= set(fns)
    assert any("no ort/ort-opt rows: onnxruntime is not installed" in n for n in core.NOTICES), core.NOTICES
    assert any("no hf-sdpa-compile row (RuntimeError: inductor needs" in n for n in core.NOTICES), core.NOTICES


def test_a_peer_that_does_not_match_is_dropped():
    ref = torch.randn(2, 5, 8)
    fns = {"hf-eager": lambda: ref, "hf-sdpa": lambda: ref + 1e-6}
    notes = []
    peers = {"close": lambda: (lambda: ref - 5e-5), "wrong": lambda: (lambda: ref * 1.01),
             "nan": lambda: (lambda: ref + float("nan"))}
    ort.check_peers(fns, peers, "hf-eager", "hf-sdpa", notes.append, "case")
    assert set(fns) == {"hf-eager", "hf-sdpa", "close"}
    assert any("no wrong row" in n for n in notes) and any("no nan row" in n for n in notes), notes


def test_pause_between_calls_is_not_timed():
    calls = []

    def call():  # 2 ms, longer than a sample (1 ms): one call per sample
        calls.append(time.perf_counter())
        time.sleep(0.002)
    fns = {"a": call, "b": call}
    res = core.time_interleaved(fns, budget_s=0.0, min_rounds=3, max_rounds=3, pause_s=0.03)
    assert all(res[n].median < 0.01 for n in fns), res  # the samples exclude the sleeps
    gaps = [b - a for a, b in zip(calls[-6:], calls[-5:])]
    assert min(gaps) >= 0.025, gaps  # ... which happen between the calls


def test_bert_processes_times_each_implementation_in_its_own_process(monkeypatch, capsys):
    """bench.bert_processes: one fresh process per implementation and round, each checked against
    transformers (the report's max|diff|), and a peer's ratio over forkattn per round."""
    import os

    from forkattn.bench import bert_processes
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.path.join(root, "python"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bert_processes.main(["--model", "small", "--seqlen", "16", "--batch", "3", "--rounds", "2", "--reps", "2",
                         "--impls", "forkattn,hf-sdpa"])
    out = capsys.readouterr().out
    assert "small B3 L16, 2 threads, 2 processes x 2 calls each" in out
    diffs = [float(line.split("transformers")[1]) for line in out.splitlines() if "max|diff|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out
    assert "hf-sdpa / forkattn per round:" in out
    with pytest.raises(SystemExit):
        bert_processes.main(["--impls", "ort,hf-sdpa"])  # forkattn is the reference row
