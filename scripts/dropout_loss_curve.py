"""Training with attention dropout: forkattn's BERT / GPT-2 vs transformers' (issue #16).

    PYTHONPATH=python python3 scripts/dropout_loss_curve.py --out DIR [--models bert,gpt2]
        [--steps 300] [--seeds 4] [--p 0.1] [--hidden-dropout 0.0] [--window 50]

Both libraries train the same tiny model from the same random initialisation (transformers builds
it, forkattn loads its state dict) on the same batches, with the same optimizer, attention dropout
p on the attention probabilities; only the dropout masks differ (forkattn's Philox masks, torch's
bernoulli ones in transformers), so the curves are compared statistically: each run's mean
training loss over the last `window` steps, over `seeds` runs per library (torch.manual_seed(s)
before each run). They agree when

    |mean(forkattn) - mean(transformers)| <= z * sd(transformers) * sqrt(2 / seeds)

with sd the run-to-run spread of transformers' runs (z = 4: few runs, heavy tails). A control,
forkattn with attention dropout off, shows whether the comparison can tell dropout from none (its
verdict should be "differs"; a note says when it does not). Exit status 1: forkattn at p differs.

The task makes attention matter: every row is periodic (x[t] = x[t - period]), right padded to
a random length in [L/2, L], so a masked token (BERT, 15% of the real tokens, replaced by [MASK])
or the next token (GPT-2) is recoverable only by attending `period` positions away; dropping that
attention probability costs loss. BERT runs its unpadded (varlen) path, GPT-2 its key-padding path.

Writes DIR/dropout_loss_curve.csv (model, impl, p_attn, seed, step, loss) and
DIR/dropout_loss_curve.png (mean curve per group, min-max band over seeds), prints a summary.
tests/test_dropout_loss_curve.py runs a short version and asserts the agreement.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

PAD, MASK, FIRST = 0, 1, 2  # token ids: padding, [MASK], first content token


@dataclass
class Setup:
    model: str = "bert"  # "bert" or "gpt2"
    vocab: int = 24
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    seq: int = 32
    period: int = 4
    batch: int = 32
    steps: int = 300
    lr: float = 3e-3
    p: float = 0.1  # attention-probability dropout
    hidden_dropout: float = 0.0
    init_seed: int = 0
    data_seed: int = 1
    backend: Optional[str] = None  # forkattn's attention backend (None: fastest)
    hf_attn: str = "sdpa"  # transformers' attn_implementation


def make_batches(s: Setup) -> List[Dict[str, torch.Tensor]]:
    """The same `steps` batches for every run: periodic rows, right padded, labels per model."""
    g = torch.Generator().manual_seed(s.data_seed)
    out = []
    for _ in range(s.steps):
        base = torch.randint(FIRST, s.vocab, (s.batch, s.period), generator=g)
        ids = base.repeat(1, -(-s.seq // s.period))[:, : s.seq]
        n = torch.randint(s.seq // 2, s.seq + 1, (s.batch, 1), generator=g)
        mask = torch.arange(s.seq)[None] < n
        ids = ids.masked_fill(~mask, PAD)
        if s.model == "bert":
            pick = (torch.rand(ids.shape, generator=g) < 0.15) & mask
            pick[0, 0] = True  # never an empty loss
            labels = torch.where(pick, ids, -100)
            ids = ids.masked_fill(pick, MASK)
        else:
            labels = ids.masked_fill(~mask, -100)
        out.append(dict(input_ids=ids, attention_mask=mask.long(), labels=labels))
    return out


def hf_model(s: Setup, p: float):
    """transformers' model with the initialisation of s.init_seed (independent of p)."""
    import transformers

    torch.manual_seed(s.init_seed)
    if s.model == "bert":
        cfg = transformers.BertConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                                      num_attention_heads=s.heads, intermediate_size=4 * s.hidden,
                                      max_position_embeddings=s.seq, hidden_dropout_prob=s.hidden_dropout,
                                      attention_probs_dropout_prob=p, pad_token_id=PAD)
        m = transformers.BertForMaskedLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=s.vocab, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
                                      n_positions=s.seq, resid_pdrop=s.hidden_dropout, embd_pdrop=s.hidden_dropout,
                                      attn_pdrop=p, pad_token_id=PAD, bos_token_id=FIRST, eos_token_id=FIRST)
        m = transformers.GPT2LMHeadModel(cfg)
    m.set_attn_implementation(s.hf_attn)
    return m


def forkattn_model(s: Setup, p: float):
    """forkattn's model with transformers' initial weights (the same init as hf_model)."""
    from forkattn.models import GPT, GPTConfig
    from forkattn.models.bert import BertConfig, BertForMaskedLM

    hf = hf_model(s, p)
    d = hf.config.to_dict()
    if s.model == "bert":
        m = BertForMaskedLM(BertConfig.from_dict(d, attention_backend=s.backend))
    else:
        m = GPT(GPTConfig.from_dict(d), backend=s.backend)
    info = m.load_hf_state_dict(hf.state_dict(), strict=False)
    if info["missing_keys"]:
        raise RuntimeError(f"forkattn's {s.model} did not get every initial weight: {info['missing_keys']}")
    return m


def train(model, batches, s: Setup, seed: int) -> List[float]:
    """Training losses of one run (dropout masks from torch.manual_seed(seed))."""
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    model.train()
    torch.manual_seed(seed)
    losses = []
    for b in batches:
        loss = model(**b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@dataclass
class Group:
    impl: str
    p: float
    runs: Dict[int, List[float]] = field(default_factory=dict)

    def tails(self, window: int) -> List[float]:
        return [statistics.fmean(r[-window:]) for r in self.runs.values()]


def run_groups(s: Setup, seeds: List[int], control: bool = True) -> List[Group]:
    """transformers and forkattn at s.p (one run per seed each), and forkattn at p = 0 (control;
    one run when no dropout is left in it: the other seeds would repeat it bit for bit)."""
    batches = make_batches(s)
    groups = [Group("transformers", s.p), Group("forkattn", s.p)]
    if control:
        groups.append(Group("forkattn", 0.0))
    for g in groups:
        for seed in (seeds[:1] if g.p == 0 and s.hidden_dropout == 0 else seeds):
            m = hf_model(s, g.p) if g.impl == "transformers" else forkattn_model(s, g.p)
            g.runs[seed] = train(m, batches, s, seed)
    return groups


def compare(ours: Group, ref: Group, window: int, z: float = 4.0) -> dict:
    """Last-window mean losses of two groups and whether they agree within z standard errors of
    the reference's run-to-run spread (see the module docstring)."""
    a, b = ours.tails(window), ref.tails(window)
    sd = statistics.stdev(b) if len(b) > 1 else float("nan")
    tol = z * sd * math.sqrt(1 / len(a) + 1 / len(b))
    diff = statistics.fmean(a) - statistics.fmean(b)
    return dict(mean=statistics.fmean(a), sd=statistics.stdev(a) if len(a) > 1 else float("nan"),
                ref_mean=statistics.fmean(b), ref_sd=sd, diff=diff, tol=tol, agree=abs(diff) <= tol)


def write_outputs(out_dir: str, results: Dict[str, List[Group]], window: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "dropout_loss_curve.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "impl", "p_attn", "seed", "step", "loss"])
        for model, groups in results.items():
            for g in groups:
                for seed, losses in g.runs.items():
                    w.writerows([model, g.impl, g.p, seed, i, f"{x:.6f}"] for i, x in enumerate(losses))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (model, groups) in zip(axes[0], results.items()):
        for g in groups:
            runs = torch.tensor(list(g.runs.values()))
            smooth = torch.nn.functional.avg_pool1d(runs[:, None], 9, 1, 4, count_include_pad=False)[:, 0]
            steps = range(runs.shape[1])
            line, = ax.plot(steps, smooth.mean(0), label=f"{g.impl}, attention dropout {g.p} ({len(g.runs)} seeds)")
            ax.fill_between(steps, smooth.min(0).values, smooth.max(0).values, color=line.get_color(), alpha=0.2)
        n = len(next(iter(groups[0].runs.values())))
        ax.axvspan(n - window, n, color="grey", alpha=0.1)
        ax.set(title=f"{model}: training loss (9-step mean; band: min-max over seeds)", xlabel="step", ylabel="loss",
               yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "dropout_loss_curve.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the CSV and the chart")
    ap.add_argument("--models", default="bert,gpt2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4, help="runs per group")
    ap.add_argument("--p", type=float, default=0.1, help="attention dropout")
    ap.add_argument("--hidden-dropout", type=float, default=0.0)
    ap.add_argument("--window", type=int, default=50, help="last steps averaged per run")
    ap.add_argument("--z", type=float, default=4.0)
    ap.add_argument("--backend", default=None, help="forkattn attention backend (default: fastest)")
    ap.add_argument("--threads", type=int, default=1)
    for name in ("vocab", "hidden", "layers", "heads", "seq", "period", "batch", "lr"):  # the task and model size
        ap.add_argument(f"--{name}", type=type(getattr(Setup, name)), default=getattr(Setup, name))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(1, args.seeds + 1))
    results, verdicts = {}, []
    print(f"attention dropout {args.p}, hidden dropout {args.hidden_dropout}, {args.steps} steps, {args.seeds} seeds, "
          f"last {args.window} steps, z={args.z}, torch {torch.__version__}")
    for model in args.models.split(","):
        s = Setup(model=model, steps=args.steps, p=args.p, hidden_dropout=args.hidden_dropout, backend=args.backend,
                  **{k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "seq", "period", "batch", "lr")})
        t0 = time.perf_counter()
        groups = results[model] = run_groups(s, seeds)
        for g in groups[1:]:
            c = compare(g, groups[0], args.window, args.z)
            verdicts.append((model, g, c))
            print(f"{model:5s} {g.impl} p={g.p}: last-{args.window} loss {c['mean']:.4f} ± {c['sd']:.4f} vs transformers "
                  f"p={groups[0].p} {c['ref_mean']:.4f} ± {c['ref_sd']:.4f}: diff {c['diff']:+.4f}, tolerance {c['tol']:.4f} "
                  f"-> {'agrees' if c['agree'] else 'differs'}")
        print(f"{model:5s} first-step loss {statistics.fmean(r[0] for r in groups[0].runs.values()):.4f}, "
              f"{time.perf_counter() - t0:.0f} s")
    write_outputs(args.out, results, args.window)
    print(f"wrote {os.path.join(args.out, 'dropout_loss_curve.csv')} and dropout_loss_curve.png")
    for model, g, c in verdicts:
        if g.p != args.p and c["agree"]:
            print(f"note: {model}'s control (no attention dropout) is not told apart from p={args.p} either: this run "
                  "lacks the power to see the dropout (more steps or seeds, or a larger p)")
    return 0 if all(c["agree"] for _, g, c in verdicts if g.p == args.p) else 1  # exit 1: forkattn differs


if __name__ == "__main__":
    sys.exit(main())
