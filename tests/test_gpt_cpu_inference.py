"""GPT-2's CPU inference fast path (models/cpu_inference_gpt.py): taken only in eval / no grad / fp32
CPU, logits within the 2x rule of transformers, the same greedy tokens as transformers at batch 1
and 8 with left-padded prompts, and its cached weights (the tied LM head included) following every
kind of weight update."""
import warnings

import pytest
import torch

from forkattn.models import cpu_inference_gpt as fast
from forkattn.models.gpt import GPT

transformers = pytest.importorskip("transformers")
from test_gpt import max_err, pair  # noqa: E402

warnings.filterwarnings("ignore", message=".*token_id must be.*")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def counted(monkeypatch):
    """How many Block forwards and LM-head calls took the fast path."""
    n = {"block": 0, "head": 0}
    block, head = fast.block_forward, fast.lm_head

    def count_block(*a, **k):
        n["block"] += 1
        return block(*a, **k)

    def count_head(*a, **k):
        n["head"] += 1
        return head(*a, **k)
    monkeypatch.setattr(fast, "block_forward", count_block)
    monkeypatch.setattr(fast, "lm_head", count_head)
    return n


def left_padded(B, vocab=97, seed=0):
    """B prompts of different lengths (1..11 tokens), left-padded with garbage token ids."""
    g = torch.Generator().manual_seed(seed)
    lens = [1 + (5 * b + 3) % 11 for b in range(B)]
    T = max(lens)
    ids = torch.randint(3, vocab, (B, T), generator=g)  # the padding slots hold real-looking tokens
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
    return ids, mask


@pytest.mark.parametrize("act", ["gelu_new", "relu"])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("one_row", [True, False])
def test_fast_logits_within_2x_of_transformers(act, B, one_row, counted, monkeypatch):
    monkeypatch.setattr(fast, "ONE_ROW_LAYOUT", one_row)
    ref, ours = pair(activation_function=act)
    ids, mask = left_padded(B)
    if B == 1:  # one row through every GEMM: the decode-step layout
        ids, mask = ids[:, -1:], mask[:, -1:]
    with torch.no_grad():
        truth = ref.double()(ids, attention_mask=mask).logits
        hf32 = ref.float()(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert counted["block"] == 2 and counted["head"] == 1
    real = mask.bool()
    assert max_err(got[real], truth[real]) <= 2 * max_err(hf32[real], truth[real]) + 1e-5


@pytest.mark.parametrize("B", [1, 8])
def test_greedy_tokens_equal_transformers_left_padded(B, counted):
    ref, ours = pair()
    ids, mask = left_padded(B, seed=B)
    if B == 1:
        ids, mask = ids[:, -7:], mask[:, -7:]
    n = 24
    g = ours.generate(ids, n, do_sample=False, attention_mask=mask)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(g, hf)
    assert counted["block"] == 2 * n and counted["head"] == n  # prefill + n - 1 decode steps
    fast.FUSED = False
    try:
        assert torch.equal(ours.generate(ids, n, do_sample=False, attention_mask=mask), g)
    finally:
        fast.FUSED = True


def test_fast_path_only_in_eval_no_grad_fp32_cpu(counted):
    _, ours = pair()
    ids = torch.randint(3, 97, (2, 5))
    ours(ids)  # eval with autograd on: input gradients may be wanted
    ours.train()
    with torch.no_grad():
        ours(ids)  # training mode: dropout
    ours.eval().to(torch.bfloat16)
    with torch.no_grad():
        ours(ids)
    assert counted == {"block": 0, "head": 0}
    ours.float()
    fast.FUSED = False
    try:
        with torch.no_grad():
            ours(ids)
    finally:
        fast.FUSED = True
    assert counted == {"block": 0, "head": 0}
    with torch.no_grad():
        ours(ids)
    assert counted == {"block": 2, "head": 1}


def _fresh_copy(model: GPT) -> GPT:
    other = GPT(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("update", ["optimizer", "load_state_dict", "wte_inplace", "data"])
def test_cached_weights_follow_updates(B, update):
    """Every cached copy (the four Block weights in both layouts, the tied LM head) is rebuilt after
    the parameters change; each case fails if the cache ignores the change."""
    _, ours = pair()
    ids, mask = left_padded(B, seed=5)
    ours.generate(ids, 4, do_sample=False, attention_mask=mask)  # builds the caches
    kind = fast._kind(B)  # the decode steps' weights
    assert f"_gpt_fast_{kind}" in ours.transformer.h[0].__dict__ and f"_gpt_fast_lm_head_{kind}" in ours.__dict__
    if update == "optimizer":
        ours.train()
        opt = torch.optim.SGD(ours.parameters(), lr=1.0)
        ours(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        ours.eval()
    elif update == "load_state_dict":
        _, other = pair(initializer_range=0.3)
        ours.load_state_dict(other.state_dict())
    elif update == "wte_inplace":  # the tied LM head is the token embedding
        with torch.no_grad():
            ours.transformer.wte.weight.mul_(-1.5)
    else:
        for blk in ours.transformer.h:
            blk.mlp.c_fc.weight.data = blk.mlp.c_fc.weight.data * 2
        ours.transformer.wte.weight.data = ours.transformer.wte.weight.data.flip(1).contiguous()
        ours.lm_head.weight = ours.transformer.wte.weight
    fresh = _fresh_copy(ours)
    with torch.no_grad():
        assert max_err(ours(ids, attention_mask=mask).logits, fresh(ids, attention_mask=mask).logits) < 1e-5
    assert torch.equal(ours.generate(ids, 6, do_sample=False, attention_mask=mask),
                       fresh.generate(ids, 6, do_sample=False, attention_mask=mask))
