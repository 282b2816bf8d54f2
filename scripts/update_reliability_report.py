"""`python scripts/update_reliability_report.py REPORT.md docs/reliability.md`: put the table that the reliability
tests wrote (RLHF_RELIABILITY_REPORT=REPORT.md) into the docs page between its reliability-report markers. Run by
`make reliability-report`; the table is never edited by hand."""

from __future__ import annotations

import sys
from pathlib import Path

START, END = "<!-- reliability-report:start -->", "<!-- reliability-report:end -->"
DEFAULT_PAGE = "docs/reliability.md"


def splice(page: str, table: str) -> str:
    """`page` with the text between its markers replaced by `table`."""
    if START not in page or END not in page:
        raise SystemExit(f"the page has no {START} ... {END} block")
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table.rstrip()}\n{END}{tail}"


def main(report: str, page: str = DEFAULT_PAGE) -> None:
    table = Path(report).read_text()
    Path(page).write_text(splice(Path(page).read_text(), table))
    print(f"{page}: reliability report updated ({table.count(chr(10)) - 2} rows)")


if __name__ == "__main__":
    main(*sys.argv[1:])
