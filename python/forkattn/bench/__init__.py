"""`python -m forkattn.bench`: forkattn vs PyTorch eager vs SDPA, side by side in one run.

Each op family lives in its own module here (attention, mlm, decode, bert, gpt) and exposes
`cases(device, quick) -> list[Case]`; core.py times them and writes the table, JSON and CSV.
"""
from .core import Case, main  # noqa: F401
