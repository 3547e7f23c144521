"""transformers' own models with attn_implementation "eager" vs "sdpa" vs "forkattn", in one run.

The same random weights in every implementation (one model, deep-copied, then
set_attn_implementation), so only the attention differs:
  BertModel padded inference (lengths uniform in L/2..L, one full row; GPU: BERT-base B32 L128, the
      issue's goal case), GPT-2 and a Llama-style decoder with grouped-query heads (GQA): prefill of
      a left-padded batch, and greedy generate() through transformers' DynamicCache.
fp16 on CUDA, fp32 on CPU; quick CPU mode uses small configs. "forkattn" needs
forkattn.integrations.transformers (imported here). vs_sdpa is the ratio to transformers' sdpa.

    python -m forkattn.bench --only hf [--quick] [--device cpu]
"""
from __future__ import annotations

import copy
from typing import List

import torch

from .core import Case

IMPLS = {
    "hf-eager": "transformers' model, attn_implementation='eager' (the 'vs eager' baseline)",
    "hf-sdpa": "transformers' model, attn_implementation='sdpa' (the 'vs sdpa' baseline)",
    "forkattn-hf": "transformers' model, attn_implementation='forkattn' (forkattn.integrations.transformers)",
}
REQUIRES = ("transformers",)


def _left_padded(B: int, L: int, vocab: int, device, seed: int = 0, left: bool = True):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    lengths[0] = L
    pos = torch.arange(L)[None]
    mask = (pos >= L - lengths[:, None]) if left else (pos < lengths[:, None])
    ids = torch.randint(5, vocab, (B, L), generator=g).masked_fill(~mask, 0)
    return ids.to(device), mask.long().to(device)


def _variants(model, dtype, device):
    model = model.eval().to(device=device, dtype=dtype)
    out = {}
    for impl in ("eager", "sdpa", "forkattn"):
        m = copy.deepcopy(model)
        m.set_attn_implementation(impl)
        out[impl] = m
    return out


def _configs(device, quick: bool):
    import transformers

    small = device.type == "cpu" and quick
    bert = transformers.BertConfig(**(dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                           intermediate_size=1024) if small else {}),
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gpt2 = transformers.GPT2Config(**(dict(n_embd=256, n_layer=4, n_head=4, vocab_size=8192) if small else {}),
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    llama = transformers.LlamaConfig(vocab_size=8192, hidden_size=256 if small else 1024,
                                     intermediate_size=688 if small else 2816, num_hidden_layers=4 if small else 8,
                                     num_attention_heads=8 if small else 16, num_key_value_heads=2 if small else 4,
                                     max_position_embeddings=2048)
    return bert, gpt2, llama


def _shapes(cpu: bool):
    """(batch, length) of the BERT and prefill cases and (batch, prompt, new tokens) of generate."""
    if cpu:
        return dict(bert=(8, 128), prefill=(4, 256), generate=(4, 32, 16))
    return dict(bert=(32, 128), prefill=(8, 1024), generate=(32, 128, 64))


def cases(device, size: str = "default") -> List[Case]:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cpu = device.type == "cpu"
    dt = str(dtype)[6:]
    shapes = _shapes(cpu)
    quick = size == "quick"
    common = dict(eager="hf-eager", sdpa="hf-sdpa")
    out: List[Case] = []

    def models(kind):
        """The three variants of one model (same random weights), built when the case is timed."""
        import transformers

        import forkattn.integrations.transformers  # noqa: F401  registers "forkattn"

        bert_cfg, gpt2_cfg, llama_cfg = _configs(device, quick)
        cls, cfg = {"bert": (transformers.BertModel, bert_cfg), "gpt2": (transformers.GPT2LMHeadModel, gpt2_cfg),
                    "llama-gqa": (transformers.LlamaForCausalLM, llama_cfg)}[kind]
        torch.manual_seed(0)
        return _variants(cls(cfg), dtype, device), cfg

    # --- BertModel padded inference
    B, L = shapes["bert"]

    def bert_setup(B=B, L=L):
        variants, cfg = models("bert")
        ids, mask = _left_padded(B, L, cfg.vocab_size, device, left=False)
        return _rows(variants, lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state)

    out.append(Case("hf", f"BertModel padded B{B} L{L} {dt}", setup=bert_setup, tokens=B * L,
                    chart=f"transformers models, {dt}", panel="BertModel padded", x=f"B{B} L{L}",
                    params=dict(model="bert", batch=B, seqlen=L, dtype=dt), **common))

    # --- decoders: prefill of a left-padded batch, then greedy generation
    for name in ("gpt2", "llama-gqa"):
        B, L = shapes["prefill"]

        def prefill_setup(name=name, B=B, L=L):
            variants, cfg = models(name)
            ids, mask = _left_padded(B, L, cfg.vocab_size, device)
            return _rows(variants, lambda m: m(input_ids=ids, attention_mask=mask).logits)

        out.append(Case("hf", f"{name} prefill left-padded B{B} L{L} {dt}", setup=prefill_setup, tokens=B * L,
                        chart=f"transformers models, {dt}", panel=f"{name} prefill", x=f"B{B} L{L}",
                        params=dict(model=name, batch=B, seqlen=L, dtype=dt), **common))
        B, P, new = shapes["generate"]

        def generate_setup(name=name, B=B, P=P, new=new):
            variants, cfg = models(name)
            ids, mask = _left_padded(B, P, cfg.vocab_size, device, seed=1)
            gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            return _rows(variants, lambda m: m.generate(ids, attention_mask=mask, **gen))

        out.append(Case("hf", f"{name} generate B{B} prompt {P} (left-padded) + {new} new {dt}",
                        setup=generate_setup, tokens=B * new,
                        chart=f"transformers models, {dt}", panel=f"{name} generate", x=f"B{B} P{P}+{new}",
                        params=dict(model=name, batch=B, prompt=P, new_tokens=new, dtype=dt), **common))
    return out


def _rows(variants, call):
    """One timed callable per variant, named as IMPLS names them, under inference_mode."""
    def timed(m):
        def run():
            with torch.inference_mode():
                return call(m)
        return run
    return {("forkattn-hf" if impl == "forkattn" else f"hf-{impl}"): timed(m) for impl, m in variants.items()}
