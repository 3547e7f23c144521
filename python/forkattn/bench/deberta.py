"""DeBERTa-v3-base: disentangled attention alone, and the whole encoder, forkattn vs transformers.

Implementations (IMPLS below is the legend printed with the tables):
  hf-eager           transformers' DisentangledSelfAttention (attention cases) or DebertaV2Model
                     (model cases); DeBERTa has no sdpa or flash path in transformers. The
                     "vs eager" baseline.
  forkattn-<name>    the same projections (the module's own weights) with
                     forkattn.disentangled_attention(backend=<name>), for every backend the registry
                     says can run the call here; forkattn-eager is the plain-PyTorch reference
                     (materialising the scores), the baseline the fused kernels must beat.
                     On CUDA tensors that includes forkattn-triton, the fused Triton kernel
                     (forkattn/triton/disentangled.py; autotuned on first use); Triton on CPU
                     tensors runs only in its interpreter and is left out.

Shapes: DeBERTa-v3-base attention (H12, D64, position_buckets 256, max_relative_positions 512, so
span 256, share_att_key, c2p + p2c), padded batches with lengths uniform in L/2..L (the first at
L), L128 and L512; the attention cases time the module's forward (projections of q, k, v and the
relative embeddings included, alike for every row) and forward+backward; the "attention core" cases
the same with identity projections, i.e. the attention alone. Peak memory at L2048:
`python -m forkattn.bench.deberta_memory`. The model cases run
DebertaV2Model inference (torch.inference_mode) with random weights shared by both models. The
quick set uses one short batch and a 4-layer, 256-wide model to stay a smoke test. Figures are ms.
"""
from __future__ import annotations

from typing import List

import torch

from .core import Case, fused_backends

REQUIRES = ("transformers",)
V3 = dict(relative_attention=True, position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0,
          layer_norm_eps=1e-7, max_position_embeddings=512, hidden_dropout_prob=0.0,
          attention_probs_dropout_prob=0.0)
BASE = dict(V3, vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072)
SMALL = dict(BASE, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
IMPLS = {
    "hf-eager": "transformers' DisentangledSelfAttention / DebertaV2Model (eager: its only attention path)",
    "forkattn-eager": "forkattn.disentangled_attention, backend 'eager' (plain PyTorch reference, scores materialised)",
    "forkattn-*": "forkattn.disentangled_attention with fused backend <name> (same projections as hf-eager)",
}
# per device and size: attention (B, L) shapes, model (B, L) shapes
SHAPES = {"cpu": {"quick": ([(1, 128)], [(1, 128)]), "default": ([(4, 128), (1, 512)], [(4, 128), (1, 512)]),
                  "full": ([(8, 128), (4, 512), (1, 2048)], [(8, 128), (4, 512)])},
          "cuda": {"quick": ([(32, 128)], [(32, 128)]), "default": ([(32, 128), (32, 512)], [(32, 128), (16, 512)]),
                   "full": ([(32, 128), (32, 512), (8, 2048)], [(32, 128), (32, 512)])}}


def _mask(B: int, L: int, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    return (torch.arange(L)[None] < lengths[:, None]).long().to(device)


def _attention_setup(B, L, device, dtype, pass_, seed, core=False):
    """core: the module's projections (q, k, v, and the relative embeddings' with share_att_key)
    replaced by identities, so that both rows time the attention alone (q = k = v = x: what each
    implementation does with them is the same work as with projected inputs)."""
    def build():
        import transformers
        from transformers.models.deberta_v2 import modeling_deberta_v2 as m

        import forkattn

        cfg = transformers.DebertaV2Config(**dict(BASE, num_hidden_layers=1))
        torch.manual_seed(seed)
        att = m.DisentangledSelfAttention(cfg).to(device=device, dtype=dtype).eval()
        if core:
            att.query_proj = att.key_proj = att.value_proj = torch.nn.Identity()
        H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        x = torch.randn(B, L, cfg.hidden_size, device=device, dtype=dtype)
        rel = torch.randn(2 * att.pos_ebd_size, cfg.hidden_size, device=device, dtype=dtype)
        mask = _mask(B, L, device, seed)
        ext = mask[:, None, None, :] * mask[:, None, :, None]
        rel_pos = m.build_relative_position(x, x, bucket_size=att.position_buckets,
                                            max_position=att.max_relative_positions).to(device)
        kpm = mask.bool()

        def hf(x):
            return att(x, ext, relative_pos=rel_pos, rel_embeddings=rel)[0]

        def ours(x, backend):
            def heads(t):
                return t.view(*t.shape[:-1], H, D).transpose(-3, -2)
            q, k, v = heads(att.query_proj(x)), heads(att.key_proj(x)), heads(att.value_proj(x))
            out = forkattn.disentangled_attention(q, k, v, heads(att.key_proj(rel)), heads(att.query_proj(rel)),
                                                  max_relative_positions=att.max_relative_positions,
                                                  position_buckets=att.position_buckets, key_padding_mask=kpm,
                                                  backend=backend)
            return out.transpose(1, 2).reshape(B, L, H * D)

        impls = {"hf-eager": hf}
        for b in fused_backends("disentangled_attention", device, dtype, D) + ["eager"]:
            impls[f"forkattn-{b}"] = lambda x, b=b: ours(x, b)
        if pass_ == "fwd":
            def fwd(f):
                def run():
                    with torch.no_grad():
                        return f(x)
                return run
            return {n: fwd(f) for n, f in impls.items()}
        xg, dout = x.clone().requires_grad_(), torch.randn_like(x)
        params = [xg, *att.parameters()]
        return {n: (lambda f=f: torch.autograd.grad(f(xg), params, dout, allow_unused=True)) for n, f in impls.items()}
    return build


def _model_setup(B, L, device, dtype, cfg, seed):
    def build():
        import transformers

        from forkattn.models import deberta as fd

        torch.manual_seed(seed)
        hf = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg)).to(device=device, dtype=dtype).eval()
        ours = fd.DebertaV2Model(fd.DebertaV2Config.from_dict(cfg))
        ours.load_hf_state_dict(hf.state_dict())
        ours = ours.to(device=device, dtype=dtype).eval()
        g = torch.Generator().manual_seed(seed)
        mask = _mask(B, L, device, seed)
        ids = torch.randint(5, cfg["vocab_size"], (B, L), generator=g).to(device).masked_fill(mask == 0, 0)

        def hf_run():
            with torch.inference_mode():
                return hf(input_ids=ids, attention_mask=mask).last_hidden_state

        def ours_fn(backend):
            def run():
                ours.set_attention_backend(backend)
                with torch.inference_mode():
                    return ours(ids, mask).last_hidden_state
            return run
        fns = {"hf-eager": hf_run}
        for b in fused_backends("disentangled_attention", device, dtype, cfg["hidden_size"] // cfg["num_attention_heads"]):
            fns[f"forkattn-{b}"] = ours_fn(b)
        fns["forkattn-eager"] = ours_fn("eager")
        return fns
    return build


def cases(device: torch.device, size: str = "default") -> List[Case]:
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    dt = str(dtype)[6:]
    att_shapes, model_shapes = SHAPES["cuda" if cuda else "cpu"][size]
    cfg = SMALL if size == "quick" and not cuda else BASE
    label = ("deberta-v3-base" if cfg is BASE else
             f"deberta-v3-small ({cfg['num_hidden_layers']} layers, {cfg['hidden_size']} wide)")
    common = dict(eager="hf-eager", sdpa="none")
    out = []
    for seed, (B, L) in enumerate(att_shapes):
        for core in (False, True):
            what = "attention core (no projections)" if core else "attention"
            for pass_ in ("fwd", "fwd+bwd"):
                out.append(Case("deberta", f"{what} H12 D64 span256 B{B} L{L} {dt} padded L/2..L {pass_}",
                                setup=_attention_setup(B, L, device, dtype, pass_, seed, core=core),
                                params=dict(B=B, H=12, L=L, D=64, span=256, dtype=str(dtype), core=core,
                                            **{"pass": pass_}),
                                chart=f"disentangled {what}, {dt} padded", panel=pass_, x=f"B{B} L{L}",
                                xlabel="batch x sequence length", **common))
    for seed, (B, L) in enumerate(model_shapes):
        out.append(Case("deberta", f"{label} inference B{B} L{L} {dt} padded L/2..L", tokens=B * L,
                        setup=_model_setup(B, L, device, dtype, cfg, seed),
                        params=dict(B=B, L=L, dtype=str(dtype), mode="inference", model=label),
                        chart=f"{label} inference, {dt}", x=f"B{B} L{L}", xlabel="batch x sequence length", **common))
    return out
