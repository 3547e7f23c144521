"""PNG charts of `python -m forkattn.bench`, in the manner of FlashAttention's README: one chart
per (family, chart key such as dtype and causal/padded), grouped bars of speed (TFLOP/s, TB/s,
tok/s; ms where a case has no work count) against sequence length or context, one bar per
implementation with its value on top, a sub-plot per panel (fwd, fwd+bwd)."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Tuple

from .report import unit

# baselines in greys/blues, forkattn's implementations in strong colours, the same in every chart
_BASE_COLORS = ["#9e9e9e", "#5b7fa6", "#c7c7c7", "#34495e", "#b0a8d9", "#7f8c8d"]
_OURS_COLORS = ["#e4572e", "#2e9e44", "#f2a541", "#8e44ad", "#17becf", "#d62728", "#bcbd22", "#1f77b4"]


_WARNED = []  # the missing-matplotlib line is printed once per process


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "all"


def _colors(impls: List[str]) -> Dict[str, str]:
    base = [i for i in impls if not i.startswith("forkattn-")]
    ours = [i for i in impls if i.startswith("forkattn-")]
    out = {i: _BASE_COLORS[k % len(_BASE_COLORS)] for k, i in enumerate(base)}
    out.update({i: _OURS_COLORS[k % len(_OURS_COLORS)] for k, i in enumerate(ours)})
    return out


def _label(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _quartile_values(r: dict, metric: str, v: float) -> Tuple[float, float]:
    """The metric at the run's quartile times: the error bar of a bar (v at the median)."""
    q1, q3 = r.get("ms_q1"), r.get("ms_q3")
    if not q1 or not q3:
        return v, v
    if metric == "ms":
        return v * q1 / r["ms"], v * q3 / r["ms"]
    return v * r["ms"] / q3, v * r["ms"] / q1


def write_charts(rows: List[dict], folder: str, env: dict) -> List[Tuple[str, str, str]]:
    """(title, file name, family) of each PNG written into folder; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _WARNED:
            _WARNED.append(True)
            print("charts skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    ok = [r for r in rows if r.get("ms") is not None and r.get("impl")]
    all_impls = list(dict.fromkeys(r["impl"] for r in ok))
    base = sorted((i for i in all_impls if not i.startswith("forkattn-")), key=lambda i: (i.startswith("hf-"), i))
    colors = _colors(base + [i for i in all_impls if i.startswith("forkattn-")])
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in ok:
        groups.setdefault((r["family"], r.get("chart") or ""), []).append(r)
    written = []
    for (family, chart), grows in groups.items():
        panels = list(dict.fromkeys(r.get("panel") or "" for r in grows))
        impls = [i for i in colors if any(r["impl"] == i for r in grows)]
        fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 5.2 * len(panels), 4.6), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            prows = [r for r in grows if (r.get("panel") or "") == panel]
            xs = list(dict.fromkeys(str(r.get("x") or r["case"]) for r in prows))
            metric = prows[0].get("metric") or "ms"
            factor, label = unit(metric, [r.get(metric) for r in grows])
            width = min(0.84 / max(1, len(impls)), 0.22)
            span = width * len(impls)
            for j, impl in enumerate(impls):
                pos, vals, err = [], [], [[], []]
                for i, x in enumerate(xs):
                    r = next((r for r in prows if r["impl"] == impl and str(r.get("x") or r["case"]) == x), None)
                    if r is not None and r.get(metric) is not None:
                        v = r[metric] * factor
                        pos.append(i - span / 2 + width * (j + 0.5))
                        vals.append(v)
                        lo, hi = _quartile_values(r, metric, v)
                        err[0].append(v - lo)
                        err[1].append(hi - v)
                if not vals:
                    continue
                ax.bar(pos, vals, width * 0.92, color=colors[impl], label=impl, yerr=err,
                              error_kw=dict(elinewidth=0.8, capsize=2, ecolor="#333333"))
                rot = 90 if len(impls) * len(xs) > 12 else 0
                for x_, v, hi in zip(pos, vals, err[1]):  # the value above its error bar
                    ax.annotate(_label(v), (x_, v + hi), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=7, rotation=rot)
            ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel(prows[0].get("xlabel") or "")
            better = "lower is better" if metric == "ms" else "higher is better"
            ax.set_ylabel(f"{label} ({better})")
            ax.margins(y=0.18)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            if panel:
                ax.set_title(panel, fontsize=11)
        title = f"{family}: {chart}" if chart else family
        fig.suptitle(f"{title}\n{env['device']}, torch {env['torch']}", fontsize=11)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
        rows_of_legend = -(-len(labels) // 4)
        fig.tight_layout(rect=(0, 0.04 + 0.045 * rows_of_legend, 1, 1))
        fname = f"{family}_{_slug(chart)}.png"
        fig.savefig(os.path.join(folder, fname), dpi=110)
        plt.close(fig)
        written.append((title, fname, family))
    return written
