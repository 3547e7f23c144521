"""pytest-benchmark view of `python -m forkattn.bench` (quick shapes): `make bench-pytest`."""
import pytest
import torch

from forkattn.bench import attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = attention.cases(DEVICE, quick=True)


@pytest.mark.parametrize(
    "case,impl",
    [(c, i) for c in CASES for i in c.fns],
    ids=[f"{c.name}-{i}" for c in CASES for i in c.fns],
)
def test_attention(benchmark, case, impl):
    fn = case.fns[impl]
    if DEVICE.type == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
        benchmark(run)
    else:
        benchmark(fn)
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / benchmark.stats.stats.median / 1e12
