"""Figures that the reliability tests measure (requests sent, completed, failed by status, hung, recovery time).

Each test records one row; the rows are printed as a table at the end of the
pytest run (see conftest.py) and written to `.cache/reliability.json`, so every
CI log shows them. Figures are reported, never asserted as timings.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / ".cache" / "reliability.json"
_ROWS: dict[str, dict] = {}


def record(name: str, **figures) -> None:
    _ROWS[name] = figures


def count_codes(codes) -> dict[str, int]:
    """{"OK": 30, "UNAVAILABLE": 2}, from status code names."""
    return dict(sorted(collections.Counter(codes).items()))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def table() -> list[str]:
    if not _ROWS:
        return []
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(_ROWS, indent=2, sort_keys=True))
    lines = []
    for name, figures in _ROWS.items():
        lines.append(f"{name}: " + ", ".join(f"{k} {_format(v)}" for k, v in figures.items()))
    return lines
