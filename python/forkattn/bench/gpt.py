"""GPT benchmark: prefill of a long prompt and generation tokens/s, forkattn vs transformers.

GPT-2-small config with random weights (fp16 on CUDA, fp32 on CPU; quick CPU mode uses a much
smaller config). Implementations, side by side in one run:
  forkattn-<backend>[-graph]  our GPT with that attention backend (decode: with/without CUDA graph)
  eager                       our GPT with backend "eager" (plain PyTorch attention), no graph
  sdpa / hf-eager             transformers' GPT2LMHeadModel (attn_implementation sdpa / eager)
so "vs sdpa" is the ratio against transformers-sdpa, the issue's baseline. Generation is greedy
with a fixed number of new tokens (no EOS stop); its time includes the prompt's prefill and, for
the -graph rows, the CUDA-graph capture of that call.
"""
from __future__ import annotations

from typing import List

import torch

from ..attention import BACKENDS as _ATTENTION
from ..models.gpt import GPT, GPTConfig
from .core import Case


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


def cases(device, quick: bool) -> List[Case]:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cfg = _config(device, quick)
    torch.manual_seed(0)
    model = GPT(cfg).eval().to(device=device, dtype=dtype)
    hf = _hf_models(model, dtype, device)
    try:
        from ..decode import DECODE_BACKENDS
    except ImportError:
        DECODE_BACKENDS = None

    def runs(reg, b):
        try:
            reg.resolve(b, device.type, dtype=dtype, head_dim=cfg.head_dim)
            return True
        except Exception:
            return False

    # a row per backend that runs the attention or the decode op here; the other op of that row
    # uses the fastest backend available for it (e.g. GPU prefill on "eager" until this build has
    # CUDA attention kernels)
    regs = [_ATTENTION] + ([DECODE_BACKENDS] if DECODE_BACKENDS is not None else [])
    names = sorted({b for reg in regs for b in reg.available_names()} - {"eager"})
    backends = {b: (b if runs(_ATTENTION, b) else None,
                    b if DECODE_BACKENDS is not None and runs(DECODE_BACKENDS, b) else None)
                for b in names if any(runs(reg, b) for reg in regs)}
    small_cpu = device.type == "cpu" and quick
    prefill_len = 128 if small_cpu else 1024
    prompt_len, new = (8, 16) if small_cpu else (32, 128)
    out: List[Case] = []

    # --- prefill: one forward over a long prompt, batch 1
    x = torch.randint(0, cfg.vocab_size, (1, prefill_len), device=device)

    def ours_forward(backend):
        def fn():
            with torch.no_grad():
                return model.set_backend(backend)(x).logits
        return fn

    fns = {f"forkattn-{b}": ours_forward(b) for b, (ab, _) in backends.items() if ab is not None}
    fns["eager"] = ours_forward("eager")
    for impl, m in hf.items():
        fns["sdpa" if impl == "sdpa" else "hf-eager"] = (lambda m=m: m(x).logits)
    out.append(Case("gpt", f"prefill B1 L{prefill_len} {str(dtype)[6:]} (n_embd {cfg.n_embd}, {cfg.n_layer} layers)",
                    {k: _no_grad(f) for k, f in fns.items()},
                    params=dict(batch=1, seqlen=prefill_len, dtype=str(dtype)[6:], n_layer=cfg.n_layer),
                    tokens=prefill_len))

    # --- generation: prompt + `new` greedy tokens, batch 1 and 32
    for B in (1, 32):
        prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), device=device)

        def ours_generate(backends_, graph, prompt=prompt):  # bind this case's prompt, not the loop variable
            def fn():
                model.set_backend(*backends_)
                return model.generate(prompt, new, do_sample=False, cuda_graph=graph)
            return fn

        fns = {}
        for b, pair in backends.items():
            fns[f"forkattn-{b}"] = ours_generate(pair, False)
            if device.type == "cuda":
                fns[f"forkattn-{b}-graph"] = ours_generate(pair, True)
        fns["eager"] = ours_generate(("eager", "eager"), False)
        for impl, m in hf.items():
            fns["sdpa" if impl == "sdpa" else "hf-eager"] = (
                lambda m=m, prompt=prompt: m.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0))
        out.append(Case("gpt", f"generate B{B} prompt {prompt_len} + {new} new tokens {str(dtype)[6:]}",
                        {k: _no_grad(f) for k, f in fns.items()},
                        params=dict(batch=B, prompt=prompt_len, new_tokens=new, dtype=str(dtype)[6:],
                                    n_layer=cfg.n_layer),
                        tokens=B * new))
    return out


def _no_grad(fn):
    def wrapped():
        with torch.no_grad():
            return fn()
    return wrapped
