"""Where the DeBERTa attention module's time goes on CPU, and the Amdahl bound it sets (#17).

    python -m forkattn.bench.deberta_split --threads 2 --shapes 4,128 1,512 --rounds 15
    python -m forkattn.bench.deberta_split --threads 1 --profile

One process per thread count. It builds transformers' DisentangledSelfAttention and forkattn's
(models/deberta.py, the same weights loaded into it) at DeBERTa-v3-base shapes (H12 D64, span 256,
share_att_key, c2p + p2c, padded L/2..L as bench/deberta.py's attention rows, the relative
embeddings without a gradient there as well) and times, interleaved call by call, the rows

  hf-module / fa-module   the whole module: q, k, v projections of the hidden states, the position
                          projections of rel_embeddings (query_proj / key_proj: share_att_key), the
                          attention, every transpose and copy
  proj                    the five projections alone (the same nn.Linear calls both modules make:
                          3 x [B*L, 768] and 2 x [2 * span, 768] times 768 x 768, with bias);
                          proj-x and proj-rel split them
  hf-core / fa-core       the module with its projections replaced by identities (what bench/deberta.py's
                          "attention core" rows time): attention plus the head split/merge glue

forward (no_grad) and forward+backward (autograd.grad into the hidden states and every parameter).
Per row: the median over rounds, its min..max, and the median process CPU time; /proc/loadavg
before and after. The bound: with the projections costing `proj` on both sides and everything else
free, the best module ratio is hf-module / proj. --profile prints torch.profiler's self-CPU table per
module instead (operator level: what "everything else" is made of).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .core import loadavg
from .deberta import BASE, _mask


def build(B: int, L: int, seed: int = 0) -> dict:
    """Both modules on the same weights, their inputs, and the rows' callables (x -> output)."""
    import transformers
    from transformers.models.deberta_v2 import modeling_deberta_v2 as m

    from forkattn.models import deberta as fd

    cfg = dict(BASE, num_hidden_layers=1)
    torch.manual_seed(seed)
    hf = m.DisentangledSelfAttention(transformers.DebertaV2Config(**cfg)).eval()
    fa = fd.DisentangledSelfAttention(fd.DebertaV2Config.from_dict(cfg)).eval()
    fa.load_state_dict(hf.state_dict())
    span = hf.pos_ebd_size
    x = torch.randn(B, L, 768)
    rel = torch.randn(2 * span, 768)
    mask = _mask(B, L, "cpu", seed)
    ext = mask[:, None, None, :] * mask[:, None, :, None]
    rel_pos = m.build_relative_position(x, x, bucket_size=hf.position_buckets, max_position=hf.max_relative_positions)
    kpm = mask.bool()
    ident = torch.nn.Identity()

    def hf_module(x):
        return hf(x, ext, relative_pos=rel_pos, rel_embeddings=rel)[0]

    def fa_module(x):
        return fa(x, kpm, rel)

    def cored(mod, f):
        """f with mod's q/k/v projections swapped for identities (share_att_key: the position ones too)."""
        def run(x):
            saved = mod.query_proj, mod.key_proj, mod.value_proj
            mod.query_proj = mod.key_proj = mod.value_proj = ident
            try:
                return f(x)
            finally:
                mod.query_proj, mod.key_proj, mod.value_proj = saved
        return run

    def proj_x(x):
        return torch.cat([hf.query_proj(x), hf.key_proj(x), hf.value_proj(x)], -1)

    def proj_rel(x):  # x only for the gradient's sake (unused): rel has no gradient, as in the modules
        return torch.cat([hf.query_proj(rel), hf.key_proj(rel)], -1)

    def proj(x):
        return proj_x(x), proj_rel(x)

    rows = {"hf-module": hf_module, "fa-module": fa_module, "proj": proj, "proj-x": proj_x, "proj-rel": proj_rel,
            "hf-core": cored(hf, hf_module), "fa-core": cored(fa, fa_module)}
    params = list(hf.parameters()) + list(fa.parameters())
    return dict(rows=rows, x=x, params=params, mask=mask)


def runner(f, x, params, pass_: str):
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                f(x)
        return run
    xg = x.clone().requires_grad_()

    def run():
        out = f(xg)
        outs = out if isinstance(out, tuple) else (out,)
        grads = [torch.ones_like(o) * 0.01 for o in outs]  # cheap next to the module; same for every row
        torch.autograd.grad(outs, [xg] + params, grads, allow_unused=True)
    return run


def time_rows(B: int, L: int, pass_: str, rounds: int) -> dict:
    b = build(B, L)
    runs = {n: runner(f, b["x"], b["params"], pass_) for n, f in b["rows"].items()}
    for r in runs.values():
        r(); r()
    wall = {n: [] for n in runs}
    cpu = {n: [] for n in runs}
    names = list(runs)
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in (order if i % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            runs[n]()
            wall[n].append((time.perf_counter() - t0) * 1e3)
            cpu[n].append((time.process_time() - c0) * 1e3)
    return {n: (statistics.median(wall[n]), min(wall[n]), max(wall[n]), statistics.median(cpu[n])) for n in runs}


def report(B: int, L: int, pass_: str, res: dict, threads: int) -> None:
    print(f"--- threads {threads} B{B} L{L} {pass_}  load {loadavg()}", flush=True)
    for n, (med, lo, hi, c) in res.items():
        print(f"  {n:10s} {med:8.2f} ms ({lo:.2f}..{hi:.2f}, cpu {c:.1f})")
    hf, fa, pr = res["hf-module"][0], res["fa-module"][0], res["proj"][0]
    print(f"  module ratio hf/fa {hf / fa:.2f}x | proj share of hf {pr / hf:.0%}, of fa {pr / fa:.0%} | "
          f"fa other (module - proj - core) {fa - pr - res['fa-core'][0]:.2f} ms, hf other "
          f"{hf - pr - res['hf-core'][0]:.2f} ms | Amdahl bound hf/proj {hf / pr:.2f}x", flush=True)


def profile(B: int, L: int, pass_: str, reps: int) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    b = build(B, L)
    for name in ("hf-module", "fa-module"):
        run = runner(b["rows"][name], b["x"], b["params"], pass_)
        run(); run()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(reps):
                run()
        print(f"=== {name} threads {torch.get_num_threads()} B{B} L{L} {pass_} ({reps} calls) load {loadavg()}")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=40))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=["4,128", "1,512"], help="B,L")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true", help="torch.profiler tables instead of the timers")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"load before {loadavg()} ({time.strftime('%H:%M:%S', time.gmtime())} UTC), threads {a.threads}", flush=True)
    for shape in a.shapes:
        B, L = (int(s) for s in shape.split(","))
        for pass_ in a.passes:
            if a.profile:
                profile(B, L, pass_, 5)
            else:
                report(B, L, pass_, time_rows(B, L, pass_, a.rounds), a.threads)
    print(f"load after {loadavg()}", flush=True)


if __name__ == "__main__":
    main()
