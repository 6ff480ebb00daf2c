"""The one text-table format of the project (terminal output, README tables)."""

from __future__ import annotations

from typing import Iterable, Sequence


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
  """A fixed-width Markdown table; floats are shown with 4 decimals."""
  rows = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # pylint: disable=unnecessary-lambda-assignment
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line([str(h) for h in header]), sep] + [line(r) for r in rows])
