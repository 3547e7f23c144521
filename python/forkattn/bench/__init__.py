"""`python -m forkattn.bench`: forkattn vs PyTorch eager vs SDPA (and transformers), side by side.

Each op family lives in its own module here (attention, mlm, decode, bert, gpt), registered by
one line in core.FAMILIES; core.py's docstring says what a family module provides. run.py is the
command line, report.py the tables/files/--compare/report.md, plots.py the PNG charts.
"""
from .core import Case  # noqa: F401
from .run import main  # noqa: F401
