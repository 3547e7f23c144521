"""BERT-base end to end: forkattn's BertModel (each attention backend) vs the same model with the
"eager" attention backend vs transformers' BertModel with attn_implementation "eager" and "sdpa".
forkattn-<backend> runs unpadded (the default: real tokens packed, attention_varlen);
forkattn-<backend>-padded is the padded layout with a key-padding mask, to show what unpadding
buys; forkattn-<backend>-graph (CUDA) is BertGraphRunner, the unpadded encoder in CUDA graphs;
forkattn-<backend>-sparse-mlm (training) also projects only the labelled tokens to the
vocabulary (config.sparse_prediction, what `forkattn.train bert-mlm` uses).

Random weights (the same in every model), padded batches with lengths uniform in L/2..L.
Inference: BertModel forward under inference_mode (fp16 on GPU, fp32 on CPU). Training: one
BertForMaskedLM step (15% of real tokens labelled) = forward + backward + AdamW, fp32 weights with
fp16 autocast on GPU. Attention-probability dropout is off in every model (forkattn's kernels have
none), hidden dropout 0.1 on. "eager"/"sdpa" are transformers, so vs_sdpa is the ratio to
transformers' best.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import List

import torch

from .core import Case

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)


def _flops(B: int, L: int, training: bool) -> float:
    """Matmul FLOPs of the padded encoder (no embeddings/heads): 2*tokens*weights + attention."""
    H, I, n = BASE["hidden_size"], BASE["intermediate_size"], BASE["num_hidden_layers"]
    f = n * (2 * B * L * (4 * H * H + 2 * H * I) + 4 * B * L * L * H)
    return f * 3 if training else f


def _batch(B: int, L: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, BASE["vocab_size"], (B, L), generator=g).masked_fill(mask == 0, 0)
    labels = torch.where((torch.rand(B, L, generator=g) < 0.15) & (mask == 1), ids, torch.full_like(ids, -100))
    return ids.to(device), mask.to(device), labels.to(device)


def _attention_backends(device) -> List[str]:
    from forkattn.attention import BACKENDS

    names = []
    for name in BACKENDS.preference.get(device.type, []):
        b = BACKENDS.backends.get(name)
        if b is not None and b.available() is None and b.supports(device_type=device.type, dtype=torch.float16
                                                                   if device.type == "cuda" else torch.float32,
                                                                   head_dim=64) is None:
            names.append(name)
    return names


def cases(device: torch.device, quick: bool) -> List[Case]:
    import transformers

    from forkattn.models import bert as fb

    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    shapes = [(32, 128), (32, 512)] if cuda else ([(2, 128), (1, 512)] if quick else [(4, 128), (2, 512)])
    backends = _attention_backends(device) + ["eager"]

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**BASE)
    hf_mlm = transformers.BertForMaskedLM(hf_cfg)  # the weights every model gets
    state = hf_mlm.state_dict()

    def hf_model(cls, impl, **kw):
        cfg = transformers.BertConfig(**BASE)
        cfg._attn_implementation = impl
        m = getattr(transformers, cls)(cfg, **kw)
        m.load_state_dict({k[5:] if cls == "BertModel" else k: v for k, v in state.items()
                           if cls != "BertModel" or k.startswith("bert.")}, strict=False)
        return m.to(device)

    def ours(cls):
        m = cls(fb.BertConfig(**BASE))
        m.load_hf_state_dict(state)
        return m.to(device)

    out = []
    # inference
    our_inf = ours(fb.BertModel).to(dtype).eval()
    hf_inf = {impl: hf_model("BertModel", impl, add_pooling_layer=True).to(dtype).eval() for impl in ("eager", "sdpa")}
    for B, L in shapes:
        ids, mask, _ = _batch(B, L, device)
        out.append(Case("bert", f"bert-base inference B{B} L{L} {str(dtype)[6:]} padded L/2..L",
                        _inference_fns(our_inf, hf_inf, backends, ids, mask, cuda),
                        flops=_flops(B, L, False), params={"B": B, "L": L, "dtype": str(dtype), "mode": "inference"}))

    # one training step (MLM head)
    our_tr = ours(fb.BertForMaskedLM).train()
    hf_tr = {impl: hf_model("BertForMaskedLM", impl).train() for impl in ("eager", "sdpa")}
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in [our_tr, *hf_tr.values()]}
    for B, L in shapes:
        ids, mask, labels = _batch(B, L, device, seed=1)
        out.append(Case("bert", f"bert-base MLM train step B{B} L{L} {'fp16-autocast' if cuda else 'fp32'} padded",
                        _train_fns(our_tr, hf_tr, opts, backends, ids, mask, labels, cuda),
                        flops=_flops(B, L, True), params={"B": B, "L": L, "dtype": str(dtype), "mode": "train"}))
    return out


# The timed callables. Built by these functions so each case's closures bind its own batch.

def _inference_fns(our, hf_models, backends, ids, mask, cuda):
    from forkattn.models.bert_graphs import BertGraphRunner

    def ours_fn(backend, unpad):
        def run():
            our.set_attention_backend(backend)
            our.config.unpad_inputs = unpad
            with torch.inference_mode():
                return our(ids, attention_mask=mask).last_hidden_state
        return run

    fns = {f"forkattn-{b}": ours_fn(b, True) for b in backends}
    fns[f"forkattn-{backends[0]}-padded"] = ours_fn(backends[0], False)
    if cuda:
        runner = []

        def graphed(backend=backends[0]):
            our.set_attention_backend(backend)
            our.config.unpad_inputs = True
            if not runner:  # graphs are captured on the first (warm-up) call
                runner.append(BertGraphRunner(our, max_batch=ids.shape[0], max_seqlen=ids.shape[1], token_bucket=128))
            return runner[0](ids, mask).last_hidden_state
        fns[f"forkattn-{backends[0]}-graph"] = graphed
    for impl, m in hf_models.items():
        def run_hf(m=m):
            with torch.inference_mode():
                return m(input_ids=ids, attention_mask=mask).last_hidden_state
        fns[impl] = run_hf
    return fns


def _train_fns(our, hf_models, opts, backends, ids, mask, labels, cuda):
    amp = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else nullcontext

    def step(m, call):
        opt = opts[id(m)]
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = call()
        loss.backward()
        opt.step()
        return loss

    def ours_fn(backend, unpad, sparse=False):
        def run():
            our.set_attention_backend(backend)
            our.config.unpad_inputs = unpad
            our.config.sparse_prediction = sparse
            return step(our, lambda: our(ids, attention_mask=mask, labels=labels).loss)
        return run

    fns = {f"forkattn-{b}": ours_fn(b, True) for b in backends}
    fns[f"forkattn-{backends[0]}-padded"] = ours_fn(backends[0], False)
    fns[f"forkattn-{backends[0]}-sparse-mlm"] = ours_fn(backends[0], True, sparse=True)
    for impl, m in hf_models.items():
        fns[impl] = lambda m=m: step(m, lambda: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    return fns
