"""Tables, files and comparisons of `python -m forkattn.bench`: the per-case console tables,
JSON/CSV rows, the summary, `--compare`, and report.md."""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional, Sequence

from .core import NOISY

METRICS = {"tflops": "TFLOP/s", "tbps": "TB/s", "tok_s": "tok/s", "ms": "ms"}
_SMALLER = {"tflops": (1e3, "GFLOP/s"), "tbps": (1e3, "GB/s")}


def unit(metric: str, values) -> tuple:
    """(factor, label) for showing a metric: GFLOP/s and GB/s where every value is below 1 T."""
    values = [v for v in values if v is not None]
    if metric in _SMALLER and values and max(values) < 1:
        return _SMALLER[metric]
    return 1.0, METRICS.get(metric, metric)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def minutes(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"


def fmt_ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def fmt_num(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}" if v >= 0.01 else f"{v:.2e}"


def fmt_ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_spread(r: dict) -> str:
    """The interquartile range relative to the median; "!" marks a noisy row."""
    s = r.get("spread")
    return "-" if s is None else f"{s:.0%}" + ("!" if s > NOISY else "")


def table(header: Sequence[str], body: List[Sequence[str]], indent: str = "  ", left: int = 1) -> str:
    """Columns sized to their longest cell; the first `left` columns left-aligned, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    lines = []
    for cells in [header, *body]:
        parts = [str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        lines.append(indent + "  ".join(parts).rstrip())
    return "\n".join(lines)


def _columns(rows: List[dict]):
    """(header, getter) for the columns that mean something for these rows."""
    ok = [r for r in rows if r.get("ms") is not None]
    cols = [("impl", lambda r: r["impl"]), ("ms", lambda r: fmt_ms(r["ms"])), ("IQR", fmt_spread)]
    for key in ("tflops", "tbps", "tok_s"):
        if any(key in r for r in ok):
            factor, label = unit(key, [r.get(key) for r in ok])
            cols.append((label, lambda r, key=key, f=factor: fmt_num(r[key] * f if key in r else None)))
    for key, impl_key in (("vs_eager", "eager_impl"), ("vs_sdpa", "sdpa_impl")):
        base = next((r[impl_key] for r in ok if r.get(impl_key)), None)
        if base:
            cols.append((f"vs {base}", lambda r, key=key: fmt_ratio(r.get(key))))
    return cols


def case_table(rows: List[dict], indent: str = "  ") -> str:
    cols = _columns(rows)
    body, errors = [], []
    for r in rows:
        if r.get("ms") is None:
            errors.append(f"{indent}{r['impl']}: {r.get('error')}")
        else:
            body.append([get(r) for _, get in cols])
    out = table([h for h, _ in cols], body, indent) if body else ""
    return "\n".join([out] + errors) if errors else out


def print_case(case, rows: List[dict]) -> None:
    print(case_table(rows), flush=True)


def print_legend(legend: Dict[str, str]) -> None:
    w = max(len(k) for k in legend)
    for key, text in legend.items():
        print(f"  {key:<{w}}  {text}")


# ---------------------------------------------------------------- files

def write_rows(base: str, rows: List[dict], env: dict, extra: Optional[dict] = None) -> None:
    """base.json ({environment, rows, ...extra}) and base.csv (one line per row), replaced atomically."""
    tmp = base + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": env, "rows": rows, **(extra or {})}, f, indent=1, default=str)
    os.replace(tmp, base + ".json")
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = base + ".csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "timestamp", "torch", "forkattn"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"device": env["device"], "timestamp": env["timestamp"], "torch": env["torch"],
                        "forkattn": env["forkattn"]["version"], **r})
    os.replace(tmp, base + ".csv")


def load_results(path: str) -> dict:
    """An earlier run's results.json (or the run folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "rows" not in data:
        raise ValueError("not a forkattn bench results file (no 'rows')")
    data.setdefault("environment", {})
    return data


# ---------------------------------------------------------------- summary

def _is_ours(impl: Optional[str]) -> bool:
    return bool(impl) and impl.startswith("forkattn-") and not impl.startswith("forkattn-eager")


def summary(rows: List[dict]) -> List[dict]:
    """Per case: the fastest forkattn implementation (its eager-attention variant aside)."""
    out, seen = [], {}
    for r in rows:
        key = (r["family"], r["case"])
        if key not in seen:
            seen[key] = {"family": r["family"], "case": r["case"], "best": None}
            out.append(seen[key])
        best = seen[key]["best"]
        if _is_ours(r.get("impl")) and r.get("ms") is not None and (best is None or r["ms"] < best["ms"]):
            seen[key]["best"] = r
    return out


def _summary_body(summ: List[dict]) -> List[List[str]]:
    body = []
    for s in summ:
        b = s["best"]
        if b is None:
            body.append([f"{s['family']}: {s['case']}", "-", "-", "-", "-", "-"])
        else:
            body.append([f"{s['family']}: {s['case']}", b["impl"], fmt_ms(b["ms"]), fmt_spread(b),
                         fmt_ratio(b.get("vs_eager")), fmt_ratio(b.get("vs_sdpa"))])
    return body


SUMMARY_HEADER = ["case", "best forkattn", "ms", "IQR", "vs eager", "vs SDPA"]


def baseline_notes(rows: List[dict]) -> List[str]:
    """Families whose "eager"/"SDPA" baselines are other implementations (e.g. transformers')."""
    notes = {}
    for r in rows:
        e, s = r.get("eager_impl"), r.get("sdpa_impl")
        if (e and e != "eager") or (s and s != "sdpa"):
            notes[r["family"]] = f"{r['family']}: vs eager = vs {e or '-'}, vs SDPA = vs {s or '-'}"
    return list(notes.values())


def print_summary(summ: List[dict]) -> None:
    print(table(SUMMARY_HEADER, _summary_body(summ), left=2))
    rows = [s["best"] for s in summ if s["best"]]
    for note in baseline_notes(rows):
        print(f"  {note}")


# ---------------------------------------------------------------- --compare

def compare(previous: dict, rows: List[dict], floor: float = 0.05) -> dict:
    """Speed ratios old/new per (family, case, impl) in both runs. A row is a regression when
    new/old - 1 exceeds its noise: both runs' relative IQRs added (twice the gap at which the
    two quartile ranges stop overlapping), and at least `floor`; an improvement the other way."""
    old = {(r.get("family"), r.get("case"), r.get("impl")): r for r in previous["rows"] if r.get("ms")}
    out, only_new = [], 0
    for r in rows:
        if r.get("ms") is None:
            continue
        o = old.pop((r["family"], r["case"], r["impl"]), None)
        if o is None:
            only_new += 1
            continue
        noise = max(floor, (o.get("spread") or 0.0) + (r.get("spread") or 0.0))
        slower = r["ms"] / o["ms"]
        flag = "REGRESSION" if slower - 1 > noise else "faster" if 1 / slower - 1 > noise else ""
        out.append({"family": r["family"], "case": r["case"], "impl": r["impl"], "old_ms": o["ms"],
                    "new_ms": r["ms"], "ratio": o["ms"] / r["ms"], "noise": noise, "flag": flag})
    return {"rows": out, "only_new": only_new, "only_old": len(old),
            "previous": {k: previous["environment"].get(k) for k in ("device", "timestamp", "command")}}


def _compare_body(comp: dict) -> List[List[str]]:
    return [[f"{c['family']}: {c['case']}", c["impl"], fmt_ms(c["old_ms"]), fmt_ms(c["new_ms"]),
             fmt_ratio(c["ratio"]), f"±{c['noise']:.0%}", c["flag"]] for c in comp["rows"]]


COMPARE_HEADER = ["case", "impl", "old ms", "new ms", "old/new", "noise", ""]


def print_comparison(comp: dict) -> None:
    print(table(COMPARE_HEADER, _compare_body(comp), left=2))
    reg = sum(c["flag"] == "REGRESSION" for c in comp["rows"])
    fast = sum(c["flag"] == "faster" for c in comp["rows"])
    print(f"  {reg} regressions, {fast} faster beyond the noise (old/new > 1: faster now); "
          f"{comp['only_new']} rows only in this run, {comp['only_old']} only in the previous one")


# ---------------------------------------------------------------- report.md

def _md_table(header: Sequence[str], body: List[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in [header, *body]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc[1:]])


def write_markdown(path: str, env: dict, rows: List[dict], legends: Dict[str, Dict[str, str]],
                   summ: List[dict], charts: List[tuple], comparison: Optional[dict],
                   status: Dict[str, str], notices: List[str]) -> str:
    fa = env["forkattn"]
    out = [f"# forkattn benchmark, {env['timestamp']}", "",
           f"- device: {env['device']}",
           f"- torch {env['torch']}, triton {env.get('triton')}, forkattn {fa['version']} "
           f"(backends: {', '.join(fa['backends'])}), Python {env['python']}",
           f"- command: `{env['command']}` ({env['size']} set, {minutes(env.get('wall_s', 0))})",
           f"- load average: {env.get('loadavg_start')} at start, {env.get('loadavg_end')} at end "
           f"({env.get('cores')} cores)",
           "- ms: median over interleaved rounds; IQR: interquartile range / median "
           f"(`!` above {NOISY:.0%}: noisy, the machine was busy)", ""]
    for line in notices:
        out.append(f"- {line}")
    for name, text in status.items():
        if text.startswith("failed"):
            out.append(f"- **{name} {text}**")
    out += ["", "## Summary", "", _md_table(SUMMARY_HEADER, _summary_body(summ)), ""]
    out += [f"{n}  " for n in baseline_notes([s["best"] for s in summ if s["best"]])]
    if comparison is not None:
        p = comparison["previous"]
        out += ["", f"## Compared with {p.get('timestamp')} ({p.get('device')})", "",
                "old/new > 1: faster now; noise = both runs' relative IQRs added (at least 5%).", "",
                _md_table(COMPARE_HEADER, _compare_body(comparison))]
    by_chart = {}
    for title, fname, family in charts:
        by_chart.setdefault(family, []).append((title, fname))
    for family in dict.fromkeys(r["family"] for r in rows):
        fam_rows = [r for r in rows if r["family"] == family]
        out += ["", f"## {family}", ""]
        for key, text in legends.get(family, {}).items():
            out.append(f"- `{key}`: {text}")
        for title, fname in by_chart.get(family, []):
            out += ["", f"![{title}]({fname})"]
        for case in dict.fromkeys(r["case"] for r in fam_rows):
            case_rows = [r for r in fam_rows if r["case"] == case]
            cols = _columns(case_rows)
            body = [[get(r) for _, get in cols] for r in case_rows if r.get("ms") is not None]
            out += ["", f"### {case}", ""]
            if body:
                out.append(_md_table([h for h, _ in cols], body))
            out += [f"- {r['impl']}: {r.get('error')}" for r in case_rows if r.get("ms") is None]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return path
