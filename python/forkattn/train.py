"""`python -m forkattn.train {bert-mlm,bert-finetune,gpt} ...`: training entry points.

Each subcommand lives in forkattn.training.<family> as `main(argv)`; this file only dispatches.
"""
import importlib
import sys

COMMANDS = {
    "bert-mlm": ("forkattn.training.bert", "main_mlm"),
    "bert-finetune": ("forkattn.training.bert", "main_finetune"),
    "gpt": ("forkattn.training.gpt", "main"),
    "label": ("forkattn.training.label", "main"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m forkattn.train {{{','.join(COMMANDS)}}} [options]  (--help after a command)")
        return 2
    module, fn = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
