"""One-row GEMMs split across threads (_C.linear_split_cpu, csrc/gemv.h), which GPT-2's batch-1
decode steps use with more than one thread (models/cpu_inference_gpt.py): equal to one ATen GEMM
for both weight layouts, with and without bias, at odd widths and thread counts; bad arguments
raise ValueError; and with it on, logits within the 2x rule and the same greedy tokens as
transformers."""
import warnings

import pytest
import torch

from forkattn import _native
from forkattn.models import cpu_inference_gpt as fast

pytestmark = pytest.mark.skipif(getattr(_native._C, "linear_split_cpu", None) is None,
                                reason="forkattn._C without linear_split_cpu")


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("N", [1, 7, 97, 129, 1025, 3072])
@pytest.mark.parametrize("in_out", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M", [1, 3])
def test_linear_split_matches_aten(threads, N, in_out, bias, M):
    g = torch.Generator().manual_seed(N)
    K = 97
    x = torch.randn(M, K, generator=g)
    w = torch.randn(K, N, generator=g) if in_out else torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = _native._C.linear_split_cpu(x, w, b, in_out)
    w_io = w if in_out else w.t()
    ref = x.double() @ w_io.double() + (b.double() if bias else 0)
    eager = x @ w_io + (b if bias else 0)
    assert y.shape == (M, N) and y.is_contiguous()
    err, base = (y.double() - ref).abs().max().item(), (eager.double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.randn(1, 8, dtype=torch.float64)), "float32"),
    (dict(x=torch.randn(8)), r"\[M, K\]"),
    (dict(w=torch.randn(9, 16)), "K = x.size"),
    (dict(bias=torch.randn(15)), "bias"),
])
def test_linear_split_bad_arguments(kw, match):
    args = dict(x=torch.randn(1, 8), w=torch.randn(8, 16), bias=torch.randn(16), w_in_out=True)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        _native._C.linear_split_cpu(args["x"], args["w"], args["bias"], args["w_in_out"])


transformers = pytest.importorskip("transformers")
from test_gpt import max_err, pair  # noqa: E402

warnings.filterwarnings("ignore", message=".*token_id must be.*")


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_gpt_b1_split_logits_and_greedy_tokens(threads, monkeypatch):
    calls = []
    split = fast._SPLIT
    monkeypatch.setattr(fast, "_SPLIT", lambda *a: calls.append(1) or split(*a))
    ref, ours = pair()
    ids = torch.randint(3, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = ref.double()(ids[:, -1:]).logits
        hf32 = ref.float()(ids[:, -1:]).logits
        got = ours(ids[:, -1:]).logits
    assert calls, "the one-row GEMMs did not take the split path"
    assert max_err(got, truth) <= 2 * max_err(hf32, truth) + 1e-5
    n = 24
    g = ours.generate(ids, n, do_sample=False)
    hf = ref.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(g, hf)


def test_linear_split_refuses_autograd():
    w = torch.randn(8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        _native._C.linear_split_cpu(torch.randn(1, 8), w, None, True)
    with torch.no_grad():
        assert _native._C.linear_split_cpu(torch.randn(1, 8), w, None, True).shape == (1, 16)
