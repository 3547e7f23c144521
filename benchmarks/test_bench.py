"""pytest-benchmark view of `python -m forkattn.bench` (`make bench-pytest`): every family's cases
from the same tables (core.FAMILIES and each family module's cases()), one test per
(case, implementation).

FORKATTN_BENCH_SIZE picks the set (quick, the default here; default; full), FORKATTN_BENCH_DEVICE
the device (cuda when present). A family that cannot run (e.g. transformers missing) is one
skipped test that says what it needs.
"""
import os

import pytest
import torch

from forkattn.bench import core

SIZE = os.environ.get("FORKATTN_BENCH_SIZE", "quick")
DEVICE = torch.device(os.environ.get("FORKATTN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def _params():
    params = []
    for fam in core.FAMILIES:
        try:
            _, cases = core.load_family(fam, DEVICE, SIZE)
        except core.FamilySkipped as e:
            params.append(pytest.param(None, None, id=f"{fam.name}-skipped", marks=pytest.mark.skip(reason=str(e))))
            continue
        for case in cases:
            names = list(case.callables())  # the implementations that run here
            case.release()
            params += [pytest.param(case, impl, id=f"{fam.name}/{case.name}/{impl}") for impl in names]
    return params


_built = {}


def _fns(case):
    """The case's callables, built once for all its implementations (the previous case's freed)."""
    if _built.get("case") is not case:
        if _built:
            _built["case"].release()
        _built["case"] = case
    return case.callables()


@pytest.mark.parametrize("case,impl", _params())
def test_bench(benchmark, case, impl):
    fn = _fns(case)[impl]
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    fn()  # warm-up (and compile)
    benchmark.extra_info.update(family=case.family, case=case.name, impl=impl, **case.params)
    benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable
        return
    median = benchmark.stats.stats.median
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / median / 1e12
    if case.bytes:
        benchmark.extra_info["tbps"] = case.bytes / median / 1e12
    if case.tokens:
        benchmark.extra_info["tok_s"] = case.tokens / median
