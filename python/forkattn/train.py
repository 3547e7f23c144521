"""`python -m forkattn.train {bert-mlm,bert-finetune,gpt,label} ...`: training entry points.

Each subcommand lives in forkattn.training.<family> as `main(argv)`; this file only dispatches,
and turns a bad flag or input file (training.common.UsageError, a missing or unreadable file, a
ValueError from the input checks) into one line on stderr and exit status 2, without a traceback
(FORKATTN_TRACEBACK=1 shows it).
"""
import importlib
import os
import sys

COMMANDS = {
    "bert-mlm": ("forkattn.training.bert_pretrain", "main"),
    "bert-finetune": ("forkattn.training.bert_finetune", "main"),
    "gpt": ("forkattn.training.gpt", "main"),
    "label": ("forkattn.training.label", "main"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: python -m forkattn.train {{{','.join(COMMANDS)}}} [options]  (--help after a command)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        why = f"unknown command {argv[0]!r}" if argv else "a command is needed"
        print(f"python -m forkattn.train: error: {why}", file=sys.stderr)
        return 2
    module, fn = COMMANDS[argv[0]]
    from .training.common import UsageError

    try:
        return getattr(importlib.import_module(module), fn)(argv[1:]) or 0
    except (UsageError, OSError, ValueError) as e:
        if os.environ.get("FORKATTN_TRACEBACK") == "1":
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"python -m forkattn.train {argv[0]}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
