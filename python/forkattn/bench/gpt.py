"""GPT benchmark: prefill of a long prompt and generation tokens/s, forkattn vs transformers.

GPT-2-small config with random weights (fp16 on CUDA, fp32 on CPU; quick CPU mode uses a much
smaller config). Implementations, side by side in one run:
  forkattn-<backend>[-graph]  our GPT with that attention backend (decode: with/without CUDA graph)
  forkattn-eager              our GPT with backend "eager" (plain PyTorch attention), no graph
  hf-sdpa / hf-eager          transformers' GPT2LMHeadModel (attn_implementation sdpa / eager)
so "vs sdpa" is the ratio against transformers-sdpa, the issue's baseline, and "vs eager" against
transformers-eager (against forkattn-eager when transformers is missing). Generation is greedy
with a fixed number of new tokens (no EOS stop); its time includes the prompt's prefill and, for
the -graph rows, the CUDA-graph capture of that call.
"""
from __future__ import annotations

import importlib.util
from typing import List

import torch

from ..models.gpt import GPT, GPTConfig
from .core import Case, fused_backends, notice

IMPLS = {
    "hf-sdpa": "transformers' GPT2LMHeadModel, attn_implementation='sdpa' (the \"vs sdpa\" baseline)",
    "hf-eager": "transformers' GPT2LMHeadModel, attn_implementation='eager' (the \"vs eager\" baseline)",
    "forkattn-eager": "forkattn's GPT with plain PyTorch attention and decode (backend 'eager')",
    "forkattn-*-graph": "forkattn's GPT, decode steps in a CUDA graph (capture included in the time)",
    "forkattn-*": "forkattn's GPT with fused attention/decode backend <name>",
}


def _config(device: torch.device, quick: bool) -> GPTConfig:
    if device.type == "cpu" and quick:
        return GPTConfig(vocab_size=2048, n_positions=256, n_embd=128, n_layer=2, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPTConfig(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2 small, 124M


def _hf_models(model: GPT, dtype, device):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return {}
    cfg = model.config.to_dict()
    cfg.pop("extra", None)
    out = {}
    for impl in ("sdpa", "eager"):
        hc = GPT2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
        hc._attn_implementation = impl
        m = GPT2LMHeadModel(hc).eval()
        m.load_state_dict(model.hf_state_dict(), strict=False)  # lm_head is tied to wte
        out[impl] = m.to(device=device, dtype=dtype)
    return out


# prefill lengths, generation batches, prompt length and new tokens, per device and size
SETS = {"cpu": {"quick": ((128,), (1, 32), 8, 16), "default": ((256, 512), (1, 8), 32, 32),
                "full": ((512, 1024), (1, 32), 32, 128)},
        "cuda": {"quick": ((1024,), (1, 32), 32, 128), "default": ((512, 1024), (1, 32), 32, 128),
                 "full": ((256, 512, 1024), (1, 8, 32), 32, 128)}}


class _Models:
    """Our GPT and transformers' GPT-2 (sdpa and eager) with the same random weights, built on
    first use so that listing the cases allocates nothing."""

    def __init__(self, cfg, dtype, device):
        self.cfg, self.dtype, self.device, self._m = cfg, dtype, device, None

    def get(self):
        if self._m is None:
            torch.manual_seed(0)
            model = GPT(self.cfg).eval().to(device=self.device, dtype=self.dtype)
            self._m = model, _hf_models(model, self.dtype, self.device)
        return self._m


def _backend_pairs(device, dtype, head_dim):
    """{backend: (attention backend or None, decode backend or None)} for every fused backend that
    runs the attention or the decode op here; the other op of that row uses the fastest backend
    available for it (e.g. GPU prefill on "eager" until this build has CUDA attention kernels)."""
    attn = fused_backends("attention", device, dtype, head_dim, ("causal",))
    dec = fused_backends("decode_attention", device, dtype, head_dim)
    return {b: (b if b in attn else None, b if b in dec else None) for b in sorted(set(attn) | set(dec))}


def cases(device, size: str = "default") -> List[Case]:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    dt = str(dtype)[6:]
    cfg = _config(device, size == "quick")
    models = _Models(cfg, dtype, device)
    backends = _backend_pairs(device, dtype, cfg.head_dim)
    have_hf = importlib.util.find_spec("transformers") is not None
    if not have_hf:
        notice("gpt", "no hf-sdpa/hf-eager rows (transformers is not installed); vs eager = vs forkattn-eager")
    base = dict(eager="hf-eager", sdpa="hf-sdpa") if have_hf else dict(eager="forkattn-eager", sdpa="-")
    prefill_lens, batches, prompt_len, new = SETS["cuda" if device.type == "cuda" else "cpu"][size]
    model_label = f"n_embd {cfg.n_embd}, {cfg.n_layer} layers"
    out: List[Case] = []

    # --- prefill: one forward over a long prompt, batch 1
    for L in prefill_lens:
        def prefill(L=L):
            model, hf = models.get()
            x = torch.randint(0, cfg.vocab_size, (1, L), device=device)

            def ours(backend):
                return lambda: model.set_backend(backend)(x).logits
            fns = {f"forkattn-{b}": ours(b) for b, (ab, _) in backends.items() if ab is not None}
            fns["forkattn-eager"] = ours("eager")
            for impl, m in hf.items():
                fns[f"hf-{impl}"] = (lambda m=m: m(x).logits)
            return {k: _no_grad(f) for k, f in fns.items()}
        out.append(Case("gpt", f"prefill B1 L{L} {dt} ({model_label})", setup=prefill, tokens=L,
                        params=dict(batch=1, seqlen=L, dtype=dt, n_layer=cfg.n_layer), **base,
                        chart=f"prefill, batch 1, {dt} ({model_label})", x=f"L{L}", xlabel="prompt length"))

    # --- generation: prompt + `new` greedy tokens
    for B in batches:
        def generate(B=B):
            model, hf = models.get()
            prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)

            def ours(backends_, graph):
                def fn():
                    model.set_backend(*backends_)
                    return model.generate(prompt, new, do_sample=False, cuda_graph=graph)
                return fn
            fns = {}
            for b, pair in backends.items():
                fns[f"forkattn-{b}"] = ours(pair, False)
                if device.type == "cuda":
                    fns[f"forkattn-{b}-graph"] = ours(pair, True)
            fns["forkattn-eager"] = ours(("eager", "eager"), False)
            for impl, m in hf.items():
                fns[f"hf-{impl}"] = (lambda m=m: m.generate(prompt, max_new_tokens=new, min_new_tokens=new,
                                                            do_sample=False, pad_token_id=0))
            return {k: _no_grad(f) for k, f in fns.items()}
        out.append(Case("gpt", f"generate B{B} prompt {prompt_len} + {new} new tokens {dt}", setup=generate,
                        tokens=B * new, **base, x=f"B{B}", xlabel="batch size",
                        chart=f"greedy generation, prompt {prompt_len} + {new} new tokens, {dt} ({model_label})",
                        params=dict(batch=B, prompt=prompt_len, new_tokens=new, dtype=dt, n_layer=cfg.n_layer)))
    return out


def _no_grad(fn):
    def wrapped():
        with torch.no_grad():
            return fn()
    return wrapped
