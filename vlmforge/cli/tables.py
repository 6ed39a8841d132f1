"""Tables that keep names, ids and endpoints whole on a narrow terminal: less important columns are dropped, or
wrapped, instead (rich would otherwise cut every column to fit, ``tiny-llava-3…``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

MIN_WRAP_WIDTH = 12
"""Narrowest a wrapped column is made before a droppable column goes instead."""


@dataclass(frozen=True)
class Col:
    """One column of a :func:`fit_table`."""

    header: str
    keep: bool = False
    """A name, id or endpoint: always shown, whole, on one line."""
    drop: int | None = None
    """Where the table does not fit, droppable columns go lowest ``drop`` first; None: never dropped (wrapped)."""
    whole_words: bool = False
    """Wrapped only between words (a list of ids): the column is never narrower than its longest word."""
    justify: Literal["left", "right"] = "left"


def _width(cell: str) -> int:
    return max((cell_len(line) for line in cell.splitlines()), default=0)


def _longest_word(cell: str) -> int:
    return max((cell_len(word) for word in cell.split()), default=0)


def fit_table(console: Console, columns: Sequence[Col], rows: Sequence[Sequence[str]], **options: Any) -> Table:
    """A rich Table of ``rows`` that fits ``console``'s width: keep-columns whole, the others at least at their
    minimum (their longest word, or :data:`MIN_WRAP_WIDTH`) and wrapped, dropping droppable columns (lowest ``drop``
    first) until that fits; the room left goes to the wrapped columns. If even the keep-columns do not fit side by
    side, each row becomes a block of ``header  value`` lines (every column, nothing cut)."""
    naturals = [max([cell_len(c.header), *(_width(row[i]) for row in rows)]) for i, c in enumerate(columns)]

    def minimum(index: int) -> int:
        column = columns[index]
        if column.keep:
            return naturals[index]
        if column.whole_words:
            return max([cell_len(column.header), *(_longest_word(row[index]) for row in rows)])
        return min(naturals[index], MIN_WRAP_WIDTH)

    shown = list(range(len(columns)))
    while True:
        room = console.width - _overhead(console, len(shown), options)
        droppable = [i for i in shown if columns[i].drop is not None]
        if sum(minimum(i) for i in shown) <= room or not droppable:
            break
        shown.remove(min(droppable, key=lambda i: columns[i].drop))  # type: ignore[arg-type, return-value]
    if sum(minimum(i) for i in shown) > room:
        return _stacked(columns, rows, options)
    widths = {i: minimum(i) for i in shown}
    spare = room - sum(widths.values())
    # What is left goes to the wrapped columns, the one needing least first: each one that gets its natural width
    # is one column fewer wrapping; the last one gets the rest.
    for i in sorted(shown, key=lambda i: naturals[i] - widths[i]):
        grant = max(0, min(naturals[i] - widths[i], spare))
        widths[i] += grant
        spare -= grant
    table = Table(**options)
    for i in shown:
        column = columns[i]
        table.add_column(column.header, width=widths[i], no_wrap=column.keep, justify=column.justify,
                         overflow="fold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def _stacked(columns: Sequence[Col], rows: Sequence[Sequence[str]], options: dict[str, Any]) -> Table:
    """One block of ``header  value`` lines per row, blocks apart by a blank line (a terminal too narrow for the
    keep-columns side by side)."""
    grid = Table.grid(padding=(0, 2))
    grid.title = options.get("title")
    grid.title_justify = options.get("title_justify", "center")
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for n, row in enumerate(rows):
        if n:
            grid.add_row("", "")
        for column, cell in zip(columns, row, strict=True):
            grid.add_row(column.header, cell)
    return grid


def _overhead(console: Console, count: int, options: dict[str, Any]) -> int:
    """The width ``count`` columns' borders and padding take in a table made with ``options``."""
    probe = Table(**{**options, "title": None, "caption": None})
    for _ in range(count):
        probe.add_column(width=1)
    probe.add_row(*("x" * count))
    return Measurement.get(console, console.options.update(max_width=10_000), probe).maximum - count
