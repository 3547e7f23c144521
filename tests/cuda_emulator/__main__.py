"""The full emulation matrix: python tests/cuda_emulator [--quick] [--only attention|decode|disentangled]
(or, with tests/ on PYTHONPATH, python -m cuda_emulator). Attention: head_dim 32/64/128 x Lq, Lk in
{1, 7, 65, 97, 129} x causal, padding incl. a fully padded sequence, GQA 4/2 and 4/1, strided
inputs, varlen with an empty sequence and an oversized grid, and 19 of them with dropout (217 cases,
about 6 minutes on a 2-core machine). Decode: decode_checks.full_decode_matrix(). Disentangled (DeBERTa):
disentangled_checks.FULL (forward and backward), BWD_FULL and DROPOUT_FULL (forward and backward with
attention dropout). --quick: a handful of cases each."""
import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a folder: put tests/ (this package, attn_utils) and python/ first
    _TESTS = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(_TESTS), str(_TESTS.parent / "python")]

from cuda_emulator import attention_checks, decode_checks, disentangled_checks  # noqa: E402


def attention_main(quick):
    if quick:
        attention_checks.run_case(1, 2, 2, 65, 97, 32, True)
        attention_checks.run_case(2, 4, 2, 97, 65, 64, False, padding="full")
        attention_checks.run_varlen_case([65, 0, 7], [70, 3, 0], 2, 1, 128, True)
        attention_checks.run_case(2, 4, 2, 97, 129, 128, True, padding="full", dropout=(0.1, 7))
        print(f"mask probe: {attention_checks.run_mask_probe(2, 2, 61, 64, 64, True, 0.3, -5, padding=True)} "
              "visible elements of out and dV kept exactly where eager and philox.py keep them")
        return
    cases = attention_checks.full_matrix()
    worst, ratio = {}, {}
    for fn in cases:
        for name, (e, b) in fn().items():
            worst[name] = max(worst.get(name, (0, 0)), (e, b))
            ratio[name] = max(ratio.get(name, 0.0), e / b)
    print(f"{len(cases)} attention cases ok; largest error (its bound): "
          + " ".join(f"{n} {e:.2e} ({b:.2e})" for n, (e, b) in worst.items()))
    print("largest error / bound: " + " ".join(f"{n} {r:.2f}" for n, r in ratio.items()))
    rule2 = attention_checks.RULE2
    print(f"checks that needed the half-ulp allowance of within_budget: {len(rule2)} {sorted(set(rule2))}")


def decode_main(quick):
    dec, app = ((decode_checks.QUICK_DECODE, decode_checks.QUICK_APPEND) if quick
                else decode_checks.full_decode_matrix())
    worst = decode_checks.run_all(dec, app)
    print(f"{len(dec)} decode and {len(app)} append cases ok; largest decode error {worst:.2e} (bound 1e-4)")


def disentangled_main(quick):
    cases = disentangled_checks.QUICK if quick else disentangled_checks.FULL
    disentangled_checks.run_all(cases)
    disentangled_checks.run_all_bwd(cases)
    disentangled_checks.run_all_bwd(disentangled_checks.BWD_QUICK if quick else disentangled_checks.BWD_FULL)
    disentangled_checks.run_dropout(disentangled_checks.DROPOUT_QUICK if quick else disentangled_checks.DROPOUT_FULL)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a handful of cases only")
    ap.add_argument("--only", choices=("attention", "decode", "disentangled"), help="one kernel family")
    args = ap.parse_args(argv)
    for name, fn in (("attention", attention_main), ("decode", decode_main),
                     ("disentangled", disentangled_main)):
        if args.only in (None, name):
            t0 = time.time()
            fn(args.quick)
            print(f"{name} done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
