"""transformers' own models with attn_implementation "eager" vs "sdpa" vs "forkattn", in one run.

The same random weights in every implementation (one model, deep-copied, then
set_attn_implementation), so only the attention differs:
  BertModel padded inference (lengths uniform in L/2..L, one full row; GPU: BERT-base B32 L128, the
      issue's goal case), GPT-2 and a Llama-style decoder with grouped-query heads (GQA): prefill of
      a left-padded batch, and greedy generate() through transformers' DynamicCache.
fp16 on CUDA, fp32 on CPU; quick CPU mode uses small configs. "forkattn" needs
forkattn.integrations.transformers (imported here). vs_sdpa is the ratio to transformers' sdpa.

    python -m forkattn.bench.hf [--quick] [--device cpu] [--interleave N] [--out DIR]

--interleave N (CPU, shared machines): N rounds, each timing every implementation once in turn,
and prints median and min-max per implementation instead of the core table.
"""
from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import List

import torch

from .core import Case

IMPLS = ("eager", "sdpa", "forkattn")


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
    for impl in IMPLS:
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


def cases(device, quick: bool) -> List[Case]:
    import transformers

    import forkattn.integrations.transformers  # noqa: F401  registers "forkattn"

    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cpu = device.type == "cpu"
    bert_cfg, gpt2_cfg, llama_cfg = _configs(device, quick)
    dt = str(dtype)[6:]
    shapes = _shapes(cpu)
    out: List[Case] = []

    # --- BertModel padded inference
    torch.manual_seed(0)
    bert = _variants(transformers.BertModel(bert_cfg), dtype, device)
    B, L = shapes["bert"]
    ids, mask = _left_padded(B, L, bert_cfg.vocab_size, device, left=False)
    out.append(Case("hf", f"BertModel padded B{B} L{L} {dt} (hidden {bert_cfg.hidden_size}, "
                          f"{bert_cfg.num_hidden_layers} layers)",
                    {k: _infer(lambda m=m, i=ids, a=mask: m(input_ids=i, attention_mask=a).last_hidden_state)
                     for k, m in bert.items()},
                    params=dict(model="bert", batch=B, seqlen=L, dtype=dt), tokens=int(mask.sum())))
    del bert

    # --- decoders: prefill of a left-padded batch, then greedy generation
    for name, cls, cfg in (("gpt2", transformers.GPT2LMHeadModel, gpt2_cfg),
                           ("llama-gqa", transformers.LlamaForCausalLM, llama_cfg)):
        torch.manual_seed(0)
        models = _variants(cls(cfg), dtype, device)
        B, L = shapes["prefill"]
        ids, mask = _left_padded(B, L, cfg.vocab_size, device)
        out.append(Case("hf", f"{name} prefill left-padded B{B} L{L} {dt}",
                        {k: _infer(lambda m=m, i=ids, a=mask: m(input_ids=i, attention_mask=a).logits)
                         for k, m in models.items()},
                        params=dict(model=name, batch=B, seqlen=L, dtype=dt), tokens=int(mask.sum())))
        B, P, new = shapes["generate"]
        ids, mask = _left_padded(B, P, cfg.vocab_size, device, seed=1)
        gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        out.append(Case("hf", f"{name} generate B{B} prompt {P} (left-padded) + {new} new {dt}",
                        {k: _infer(lambda m=m, i=ids, a=mask: m.generate(i, attention_mask=a, **gen))
                         for k, m in models.items()},
                        params=dict(model=name, batch=B, prompt=P, new_tokens=new, dtype=dt), tokens=B * new))
    return out


def _infer(fn):
    def wrapped():
        with torch.inference_mode():
            return fn()
    return wrapped


def interleaved(case_list: List[Case], rounds: int) -> None:
    """Every implementation once per round, in turn; median and min-max ms per implementation."""
    for case in case_list:
        times = {k: [] for k in case.fns}
        for fn in case.fns.values():
            fn()  # warm-up
        for _ in range(rounds):
            for k, fn in case.fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        sd = statistics.median(times["sdpa"]) if "sdpa" in times else None
        print(f"\n{case.family}: {case.name}  ({rounds} interleaved rounds)")
        for k, ts in times.items():
            med = statistics.median(ts)
            vs = f"{sd / med:.2f}x" if sd else "-"
            print(f"  {k:<10} median {med:9.2f} ms  min {min(ts):9.2f}  max {max(ts):9.2f}  vs sdpa {vs}")


def main(argv=None) -> int:
    import argparse

    from . import core

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.hf", add_help=False)
    p.add_argument("--interleave", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    known, rest = p.parse_known_args(argv)
    if known.interleave:
        interleaved(cases(torch.device(known.device), known.quick), known.interleave)
        return 0
    if "hf" not in core.FAMILIES:  # registered here until core lists it
        core.FAMILIES.append("hf")
    return core.main(["--only", "hf", "--device", known.device] + (["--quick"] if known.quick else []) + rest)


if __name__ == "__main__":
    raise SystemExit(main())
