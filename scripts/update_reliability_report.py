"""`python scripts/update_reliability_report.py REPORT.md README.md`: put the table that the reliability tests
wrote (RLHF_RELIABILITY_REPORT=REPORT.md) into README.md between its reliability-report markers. Run by
`make reliability-report`; the table is never edited by hand."""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- reliability-report:start -->", "<!-- reliability-report:end -->"


def splice(readme: str, table: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README has no {START} ... {END} block")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table.rstrip()}\n{END}{tail}"


def main(report: str, readme: str) -> None:
    table = Path(report).read_text()
    Path(readme).write_text(splice(Path(readme).read_text(), table))
    print(f"{readme}: reliability report updated ({table.count(chr(10)) - 2} rows)")


if __name__ == "__main__":
    main(*sys.argv[1:])
