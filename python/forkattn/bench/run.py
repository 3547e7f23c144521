"""`python -m forkattn.bench`: forkattn vs PyTorch eager vs SDPA (and transformers), side by side.

Runs each family's cases (see core.py), prints a table per case as it finishes, writes every
family's rows to JSON and CSV as soon as it has them, its PNG charts and report.md when the family
is done, and ends with one summary table. The default set is sized for about 10 minutes on 2 quiet
CPU cores, --quick for 1-2 minutes (CI's smoke set), --full has the large shapes; on a loaded
machine every set takes several times longer.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from typing import List

import torch

from . import core, report
from .core import NOISY, FamilySkipped


def environment(device: torch.device, size: str, argv: List[str]) -> dict:
    import forkattn

    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": core.device_name(device),
        "device_type": device.type,
        "cpu": core.cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "size": size,
        "command": "python -m forkattn.bench " + " ".join(argv),
        "torch": torch.__version__,
        "forkattn": forkattn.build_info(),
        "python": platform.python_version(),
        "loadavg_start": core.loadavg(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _charts(rows, folder, env):
    from . import plots

    return plots.write_charts(rows, folder, env)


def _parser() -> argparse.ArgumentParser:
    names = [f.name for f in core.FAMILIES]
    p = argparse.ArgumentParser(prog="python -m forkattn.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the smoke set CI runs: small shapes and models, short timing")
    size.add_argument("--full", action="store_true", help="every shape, longer timing (much longer than the default set)")
    p.add_argument("--only", default=",".join(names), help=f"comma-separated families of {names}")
    p.add_argument("--out", default=os.environ.get("FORKATTN_BENCH_OUT", "bench_out"),
                   help="the run's folder bench_<device>_<time>/ is made in here")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG charts (matplotlib) and put them in report.md")
    p.add_argument("--compare", metavar="PREVIOUS", help="results.json (or its folder) of an earlier run: "
                   "a table of speed ratios, regressions beyond both runs' spreads flagged")
    p.add_argument("--threads", type=int, help="torch.set_num_threads; unset: torch's choice")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = _parser()
    args = p.parse_args(argv)
    size = "quick" if args.quick else "full" if args.full else "default"
    device = torch.device(args.device)
    by_name = {f.name: f for f in core.FAMILIES}
    wanted = [f for f in args.only.split(",") if f]
    unknown = [f for f in wanted if f not in by_name]
    if unknown:
        p.error(f"unknown families {unknown}; expected some of {list(by_name)}")
    previous = None
    if args.compare:
        try:
            previous = report.load_results(args.compare)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--compare {args.compare}: {e}")
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment(device, size, argv)
    stamp = env["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    folder = os.path.join(args.out, f"bench_{device.type}_{stamp}")
    os.makedirs(folder, exist_ok=True)
    fa = env["forkattn"]
    print(f"forkattn bench ({size} set) on {env['device']}\n  torch {env['torch']}, triton {env['triton']}, "
          f"forkattn {fa['version']} (backends {', '.join(fa['backends'])}), {env['timestamp']}")
    print(f"  results: {folder}", flush=True)
    load = env["loadavg_start"]
    if device.type == "cpu" and load is not None and load > (os.cpu_count() or 1):
        print(f"  NOTE: the machine is loaded (1-minute load average {load:.1f} on {os.cpu_count()} cores): "
              "expect noisy figures; compare ratios within a case, not across runs "
              "(--threads 1 spares OpenMP kernels waiting for a busy core)")

    core.NOTICES.clear()
    status = {}
    plan = []  # list the cases of every family first (cheap), so progress can say how many remain
    for name in wanted:
        fam = by_name[name]
        try:
            mod, cases = core.load_family(fam, device, size)
            plan.append((fam, mod, cases))
        except FamilySkipped as e:
            status[name] = f"skipped: {e}"
            core.notice(name, f"skipped, {e}")
        except Exception as e:
            status[name] = f"failed: {report.one_line(e)}"
            print(f"{name}: FAILED listing its cases: {report.one_line(e)}", flush=True)
    total = sum(len(cases) for _, _, cases in plan)

    rows: List[dict] = []
    legends, charts = {}, []
    done, t_run = 0, time.perf_counter()
    while plan:
        fam, mod, cases = plan.pop(0)
        fam_rows, failures = [], []
        print(f"\n=== {fam.name}: {fam.about} ({len(cases)} case{'s' if len(cases) != 1 else ''})")
        legends[fam.name] = {}
        for case in cases:
            done += 1
            print(f"\n[{done}/{total}] {fam.name}: {case.name}", flush=True)
            t0 = time.perf_counter()
            try:
                new = core.case_rows(case, core.time_case(case.callables(), device, size, pause_s=case.pause_s))
            except Exception as e:  # the case could not be set up: one line, the family goes on
                failures.append(f"{case.name}: {report.one_line(e)}")
                print(f"  FAILED: {report.one_line(e)}", flush=True)
                new = [{"family": fam.name, "case": case.name, "impl": None, "ms": None, "error": report.one_line(e)}]
            else:
                unseen = {k: v for k, v in core.legend(mod, [r["impl"] for r in new]).items()
                          if k not in legends[fam.name]}
                if unseen:
                    legends[fam.name].update(unseen)
                    report.print_legend(unseen)
                report.print_case(case, new)
                print(f"  {time.perf_counter() - t0:.1f} s; {total - done} cases left, "
                      f"{report.minutes(time.perf_counter() - t_run)} so far", flush=True)
            finally:
                case.release()
            fam_rows += new
            rows += new
            report.write_rows(os.path.join(folder, fam.name), fam_rows, env)
            report.write_rows(os.path.join(folder, "results"), rows, env,
                              extra={"status": status, "notices": core.NOTICES, "legends": legends})
        del cases
        status[fam.name] = ("failed: " + "; ".join(failures)) if failures else "ok"
        if args.plot and fam_rows:  # the family's charts and report.md now, in case a later family crashes
            charts += _charts(fam_rows, folder, env)
        env["wall_s"] = round(time.perf_counter() - t_run, 1)
        md = report.write_markdown(os.path.join(folder, "report.md"), env, rows, legends, report.summary(rows),
                                   charts, None, status, core.NOTICES)

    env["loadavg_end"] = core.loadavg()
    env["wall_s"] = round(time.perf_counter() - t_run, 1)
    noisy = [r for r in rows if r.get("spread") is not None and r["spread"] > NOISY]
    comparison = report.compare(previous, rows) if previous is not None else None
    extra = {"status": status, "notices": core.NOTICES, "legends": legends}
    report.write_rows(os.path.join(folder, "results"), rows, env, extra=extra)
    summary = report.summary(rows)
    md = report.write_markdown(os.path.join(folder, "report.md"), env, rows, legends, summary, charts,
                               comparison, status, core.NOTICES)

    print("\n=== summary (median ms; the best forkattn implementation of each case)")
    report.print_summary(summary)
    if comparison is not None:
        print(f"\n=== compared with {args.compare} ({previous['environment'].get('device')}, "
              f"{previous['environment'].get('timestamp')})")
        report.print_comparison(comparison)
    if noisy:
        print(f"\nNOTE: {len(noisy)} of {sum(r.get('ms') is not None for r in rows)} rows have a spread "
              f"(IQR/median) above {NOISY:.0%}: the machine was loaded (load average "
              f"{env['loadavg_start']} at start, {env['loadavg_end']} at end); rerun those cases for firm figures")
    bad = {k: v for k, v in status.items() if v.startswith("failed")}
    for name, text in bad.items():
        print(f"{name}: {text}")
    print(f"\n{len(rows)} rows in {report.minutes(env['wall_s'])}; results: {folder}/results.json, results.csv, "
          f"report.md{f', {len(charts)} charts' if charts else ''}\n  {md}")
    return 1 if bad else 0
