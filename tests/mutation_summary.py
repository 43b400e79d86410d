"""Per-module counts of the last `mutmut run` (see `make mutation` and tests/MUTATION.md).

Reads the result files mutmut keeps under mutants/ for each module named in `[tool.mutmut] only_mutate`
of pyproject.toml and prints, per module: mutants, killed, survived, and every other outcome that
occurred (timeout, suspicious, no tests, segfault, not checked, ...). `--markdown` prints the table as
Markdown; `--survivors` also lists the surviving mutants by name (`mutmut show NAME` shows one).
Run from the repository root: `python -m tests.mutation_summary [--markdown] [--survivors]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code


def modules(root: Path) -> list[str]:
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(config["only_mutate"])


def results(root: Path, module: str) -> dict[str, str]:
    """Mutant name -> status ("killed", "survived", "timeout", ...) of one module's last run."""
    meta = root / "mutants" / (module + ".meta")
    if not meta.exists():
        return {}
    exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in exit_codes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--survivors", action="store_true", help="also list the surviving mutants")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root (default: here)")
    args = parser.parse_args(argv)

    rows, survivors, totals = [], [], Counter()
    for module in modules(args.root):
        statuses = results(args.root, module)
        counts = Counter(statuses.values())
        totals.update(counts)
        other = {k: v for k, v in sorted(counts.items()) if k not in ("killed", "survived")}
        rows.append((module, len(statuses), counts["killed"], counts["survived"], other))
        survivors += sorted(name for name, status in statuses.items() if status == "survived")
    total_other = {k: v for k, v in sorted(totals.items()) if k not in ("killed", "survived")}
    rows.append(("total", sum(totals.values()), totals["killed"], totals["survived"], total_other))

    def describe(other: dict[str, int]) -> str:
        return ", ".join(f"{v} {k}" for k, v in other.items()) or "-"

    if args.markdown:
        print("| module | mutants | killed | survived | other |")
        print("| --- | ---: | ---: | ---: | --- |")
        for module, n, killed, survived, other in rows:
            name = f"**{module}**" if module == "total" else f"`{module}`"
            print(f"| {name} | {n} | {killed} | {survived} | {describe(other)} |")
    else:
        width = max(len(r[0]) for r in rows)
        print(f"{'module':<{width}}  {'mutants':>7}  {'killed':>6}  {'survived':>8}  other")
        for module, n, killed, survived, other in rows:
            print(f"{module:<{width}}  {n:>7}  {killed:>6}  {survived:>8}  {describe(other)}")
    if args.survivors:
        print("\nsurvivors (`mutmut show NAME` shows the change):")
        for name in survivors:
            print(f"  {name}")
    if not any(r[1] for r in rows):
        print("no results under mutants/: run `make mutation` (or `mutmut run`) first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
