"""BERT-base end to end: forkattn's BertModel (each attention backend) vs transformers' BertModel.

Implementations (IMPLS below is the legend printed with the tables):
  hf-eager, hf-sdpa             transformers' BertModel / BertForMaskedLM, attn_implementation
                                "eager" / "sdpa" (the "vs eager" and "vs sdpa" baselines)
  forkattn-<backend>            forkattn's BertModel, unpadded (real tokens packed, attention_varlen)
  forkattn-<backend>-padded     the padded layout with a key-padding mask, to show what unpadding buys
  forkattn-<backend>-graph      (CUDA) BertGraphRunner, the unpadded encoder in CUDA graphs
  forkattn-<backend>-sparse-mlm (training) only the labelled tokens projected to the vocabulary
                                (config.sparse_prediction, what `forkattn.train bert-mlm` uses)
  forkattn-eager                forkattn's BertModel with plain PyTorch attention
  ort, ort-opt, hf-sdpa-compile (CPU inference, the shapes of issue #18) ONNX Runtime on the exported
                                model, plain and after its BERT optimizer; torch.compile of hf-sdpa
                                (see ort.py; rows absent, with a notice, when they cannot run)

Random weights (the same in every model), padded batches with lengths uniform in L/2..L.
Inference: BertModel forward under inference_mode (fp16 on GPU, fp32 on CPU). Training: one
BertForMaskedLM step (15% of real tokens labelled) = forward + backward + AdamW, fp32 weights with
fp16 autocast on GPU. Attention-probability dropout is off in every model (the attention family
times dropout on its own rows), hidden dropout 0.1 on. The quick set uses a 4-layer, 256-wide BERT to stay a smoke test.
On CPU the default and full sets also time all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads
of 32) at the shapes of issue #18's table, with the ONNX Runtime and torch.compile peers.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import List

import torch

from . import ort as peers
from .core import Case, fused_backends, notice

BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            max_position_embeddings=512, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
MINILM = dict(BASE, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
SMALL = dict(BASE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
REQUIRES = ("transformers",)
IMPLS = {
    "hf-eager": "transformers' BERT, attn_implementation='eager'",
    "hf-sdpa": "transformers' BERT, attn_implementation='sdpa'",
    "forkattn-eager": "forkattn's BERT with plain PyTorch attention (backend 'eager'), unpadded",
    "forkattn-*-padded": "forkattn's BERT, padded batch + key-padding mask, fused attention backend <name>",
    "forkattn-*-graph": "forkattn's BERT, unpadded, in CUDA graphs (BertGraphRunner)",
    "forkattn-*-sparse-mlm": "forkattn's BERT, unpadded, MLM head on the labelled tokens only (sparse_prediction)",
    "hf-sdpa-compile": "torch.compile(transformers' BERT with sdpa), inductor, static shapes, compile time not timed",
    "ort": "ONNX Runtime (CPU provider, same threads, no spinning) on torch.onnx.export of transformers' BERT",
    "ort-opt": "ONNX Runtime on the same export after onnxruntime.transformers' BERT optimizer (fused ops)",
    "forkattn-*": "forkattn's BERT, unpadded (real tokens packed, attention_varlen), fused attention backend <name>",
}
# (B, L) per device and size: inference shapes, training-step shapes (a BERT-base step is ~3 s on 2 CPU cores)
SHAPES = {"cuda": {"quick": ([(32, 128)],) * 2, "default": ([(32, 128), (32, 512)],) * 2,
                   "full": ([(32, 128), (32, 512), (128, 128)],) * 2},
          "cpu": {"quick": ([(2, 128), (1, 512)],) * 2, "default": ([(1, 128), (4, 128), (2, 512)], [(4, 128)]),
                  "full": ([(1, 128), (8, 128), (4, 512), (8, 512)], [(4, 128), (2, 512), (8, 512)])}}
# CPU inference of the MiniLM-L6 shape (issue #18's table) per size, after the BERT-base cases
MINILM_SHAPES = {"quick": [], "default": [(1, 128)], "full": [(1, 128), (32, 128), (8, 512)]}
# (model label, B, L) of the CPU inference cases that get the ORT and torch.compile rows: issue #18's
# table. Not the quick set (an export plus a compile take minutes on 2 cores, beyond CI's smoke budget);
# the default set only at MiniLM's size: BERT-base's export + compile took 283 s of setup under load ~9
# (MiniLM's 95 s), too much for the ~10-minute default set.
PEER_SHAPES = {"quick": set(), "default": {("all-MiniLM-L6 shape", 1, 128)},
               "full": {("bert-base", 1, 128), ("bert-base", 8, 128), ("bert-base", 4, 512),
                        ("all-MiniLM-L6 shape", 1, 128), ("all-MiniLM-L6 shape", 32, 128),
                        ("all-MiniLM-L6 shape", 8, 512)}}


def _flops(B: int, L: int, training: bool, cfg=BASE) -> float:
    """Matmul FLOPs of the padded encoder (no embeddings/heads): 2*tokens*weights + attention."""
    H, I, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    f = n * (2 * B * L * (4 * H * H + 2 * H * I) + 4 * B * L * L * H)
    return f * 3 if training else f


def _batch(B: int, L: int, device, seed: int = 0, vocab_size: int = BASE["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, vocab_size, (B, L), generator=g).masked_fill(mask == 0, 0)
    labels = torch.where((torch.rand(B, L, generator=g) < 0.15) & (mask == 1), ids, torch.full_like(ids, -100))
    return ids.to(device), mask.to(device), labels.to(device)


class _Models:
    """The models of the family, built on first use (listing cases allocates nothing) and shared
    by its cases: one set for inference, one for training, all with the same random weights."""

    def __init__(self, device, cfg):
        self.device, self.cfg, self._built, self._peers = device, cfg, {}, {}

    def get(self, mode):
        if mode not in self._built:
            self._built.clear()  # inference models are done with once training starts
            self._peers.clear()
            self._built[mode] = self._build(mode)
        return self._built[mode]

    def _build(self, mode):
        import transformers

        from forkattn.models import bert as fb

        cuda = self.device.type == "cuda"
        dtype = torch.float16 if cuda else torch.float32
        torch.manual_seed(0)
        state = transformers.BertForMaskedLM(transformers.BertConfig(**self.cfg)).state_dict()

        def hf_model(cls, impl, **kw):
            cfg = transformers.BertConfig(**self.cfg)
            cfg._attn_implementation = impl
            m = getattr(transformers, cls)(cfg, **kw)
            m.load_state_dict({k[5:] if cls == "BertModel" else k: v for k, v in state.items()
                               if cls != "BertModel" or k.startswith("bert.")}, strict=False)
            return m.to(self.device)

        def ours(cls):
            m = cls(fb.BertConfig(**self.cfg))
            m.load_hf_state_dict(state)
            return m.to(self.device)

        if mode == "inference":
            return (ours(fb.BertModel).to(dtype).eval(),
                    {impl: hf_model("BertModel", impl, add_pooling_layer=True).to(dtype).eval()
                     for impl in ("eager", "sdpa")}, None)
        our = ours(fb.BertForMaskedLM).train()
        hf = {impl: hf_model("BertForMaskedLM", impl).train() for impl in ("eager", "sdpa")}
        opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-5) for m in [our, *hf.values()]}
        return our, hf, opts

    def peer(self, name):
        """An inference peer of hf-sdpa, built once for every case of this model (an export takes
        a minute): "onnx" the exported ModelProto, "ort"/"ort-opt" its sessions, "hf-sdpa-compile"
        the compiled model. A failure is kept and raised again, so it is not retried per case."""
        if name not in self._peers:
            hf = self.get("inference")[1]
            try:
                if name == "onnx":
                    self._peers[name] = peers.export_bert(hf["sdpa"], self.cfg)
                elif name == "ort":
                    self._peers[name] = peers.session(self.peer("onnx"), torch.get_num_threads())
                elif name == "ort-opt":
                    proto = peers.optimize_bert(self.peer("onnx"), self.cfg)
                    self._peers[name] = peers.session(proto, torch.get_num_threads())
                else:
                    self._peers[name] = peers.compiled(hf["sdpa"])
            except Exception as e:
                self._peers[name] = e
        if isinstance(self._peers[name], Exception):
            raise self._peers[name]
        return self._peers[name]


def _peer_fns(fns, models, ids, mask, label):
    """Add the ORT and torch.compile rows to a CPU inference case's callables, checked against
    hf-eager on the case's batch (ort.check_peers); rows that cannot run are left out with a notice."""
    def compiled():
        m = models.peer("hf-sdpa-compile")

        def run():
            with torch.inference_mode():
                return m(input_ids=ids, attention_mask=mask).last_hidden_state
        return run

    todo = {"hf-sdpa-compile": compiled}
    why = peers.ort_missing()
    if why:
        notice("bert", f"no ort/ort-opt rows: {why}")
    else:
        todo.update({name: (lambda name=name: peers.ort_fn(models.peer(name), ids, mask)) for name in ("ort", "ort-opt")})
    peers.check_peers(fns, todo, "hf-eager", "hf-sdpa", lambda text: notice("bert", text), label)
    return fns


def cases(device: torch.device, size: str = "default") -> List[Case]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    cfg = SMALL if size == "quick" and not cuda else BASE
    label = "bert-base" if cfg is BASE else f"bert-small ({cfg['num_hidden_layers']} layers, {cfg['hidden_size']} wide)"
    backends = fused_backends("attention", device, dtype, 64) + ["eager"]
    models = _Models(device, cfg)
    out = []
    common = dict(eager="hf-eager", sdpa="hf-sdpa", xlabel="batch x sequence length")
    inference_shapes, train_shapes = SHAPES["cuda" if cuda else "cpu"][size]
    inference = [(label, cfg, models, B, L) for B, L in inference_shapes]
    if not cuda and MINILM_SHAPES[size]:
        minilm = _Models(device, MINILM)
        inference += [("all-MiniLM-L6 shape", MINILM, minilm, B, L) for B, L in MINILM_SHAPES[size]]
    for name, mcfg, mset, B, L in inference:
        with_peers = not cuda and (name, B, L) in PEER_SHAPES[size]

        def setup(B=B, L=L, mcfg=mcfg, mset=mset, with_peers=with_peers, name=name):
            our, hf, _ = mset.get("inference")
            ids, mask, _ = _batch(B, L, device, vocab_size=mcfg["vocab_size"])
            fns = _inference_fns(our, hf, backends, ids, mask, cuda)
            return _peer_fns(fns, mset, ids, mask, f"{name} B{B} L{L}") if with_peers else fns
        out.append(Case("bert", f"{name} inference B{B} L{L} {str(dtype)[6:]} padded L/2..L", setup=setup,
                        flops=_flops(B, L, False, mcfg), tokens=B * L, x=f"B{B} L{L}",
                        chart=f"{name} inference, {str(dtype)[6:]}", **common,
                        pause_s=peers.PAUSE_S if with_peers and not peers.ort_missing() else 0.0,
                        params={"B": B, "L": L, "dtype": str(dtype), "mode": "inference", "model": name}))
    prec = "fp16-autocast" if cuda else "fp32"
    for B, L in train_shapes:
        def setup(B=B, L=L):
            our, hf, opts = models.get("train")
            ids, mask, labels = _batch(B, L, device, seed=1, vocab_size=cfg["vocab_size"])
            return _train_fns(our, hf, opts, backends, ids, mask, labels, cuda)
        out.append(Case("bert", f"{label} MLM train step B{B} L{L} {prec} padded", setup=setup,
                        flops=_flops(B, L, True, cfg), tokens=B * L, x=f"B{B} L{L}",
                        chart=f"{label} MLM training step, {prec}", **common,
                        params={"B": B, "L": L, "dtype": str(dtype), "mode": "train"}))
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
        fns[f"hf-{impl}"] = run_hf
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
        fns[f"hf-{impl}"] = lambda m=m: step(m, lambda: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    return fns
