"""Tables that fit the terminal: no box, two spaces between columns, and on a narrow terminal
first the short form of the cells that have one (an id's end), then the least needed columns
left out (``keep`` 0 are never left out), before Rich cuts what remains with an ellipsis.

``--wide`` shows every column in full, wider than the terminal if it must be (like
``kubectl -o wide``); scripts read ``--json`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from rich.cells import cell_len
from rich.console import Console
from rich.table import Column, Table

GAP = 2  # spaces between columns
ELLIPSIS = "…"


@dataclass(frozen=True)
class Col:
    """``keep``: 0 always shown; higher numbers are left out first. ``min_width``: how narrow
    Rich may squeeze it (a cell is cut with an ellipsis); ``fit_width``: the most this column
    asks for when deciding what fits (long free text, e.g. a model name). ``short``: the
    cell's form on a narrow terminal."""

    header: str
    keep: int = 0
    min_width: int | None = None
    fit_width: int | None = None
    justify: Literal["left", "right"] = "left"
    short: Callable[[str], str] | None = None


def short_id(value: str) -> str:
    """A task id's last 12 characters. Ids are UUIDv7s whose front is the creation time,
    shared by every task of the same minute; the end is random."""
    return value if len(value) <= 13 else ELLIPSIS + value[-12:]


def short_time(value: str) -> str:
    """``2026-12-02 06:03:05`` without its year."""
    return value[5:] if len(value) == 19 and value[4] == "-" else value


def when(at: datetime | None) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at is not None else "-"


def widths(cols: Sequence[Col], rows: Sequence[Sequence[str]]) -> list[int]:
    """Each column's natural width: its header's or its longest cell's."""
    return [max([cell_len(c.header)] + [cell_len(r[i]) for r in rows]) for i, c in enumerate(cols)]


def fit(
    cols: Sequence[Col], rows: Sequence[Sequence[str]], width: int
) -> tuple[list[int], list[list[str]]]:
    """The indexes of the columns to show at ``width``, and the rows as they are shown."""
    shown = list(range(len(cols)))

    def need(idx: list[int], cells: Sequence[Sequence[str]]) -> int:
        natural = widths(cols, cells)
        asks = (min(natural[i], cols[i].fit_width or natural[i]) for i in idx)
        return sum(asks) + GAP * (len(idx) - 1)

    cells = [list(r) for r in rows]
    if need(shown, cells) <= width:
        return shown, cells
    cells = [[c.short(v) if c.short else v for c, v in zip(cols, r, strict=True)] for r in rows]
    for i in sorted((i for i, c in enumerate(cols) if c.keep), key=lambda i: -cols[i].keep):
        if need(shown, cells) <= width:
            break
        shown.remove(i)
    return shown, cells


def allot(cols: Sequence[Col], cells: Sequence[Sequence[str]], shown: list[int],
          width: int) -> dict[int, int]:  # fmt: skip
    """Widths for the shown columns at ``width``: each column its natural width, except that
    the free-text ones (``fit_width``) share what is left, in proportion, down to their
    ``min_width``; Rich left alone would cut the narrow ones (a count, a lane) as much."""
    natural = widths(cols, cells)
    free = [i for i in shown if cols[i].fit_width]
    fixed = sum(natural[i] for i in shown if i not in free) + GAP * (len(shown) - 1)
    out = {i: natural[i] for i in shown}
    wanted = sum(natural[i] for i in free)
    room = width - fixed
    if free and wanted > room:
        for i in free:
            share = max(cols[i].min_width or 1, room * natural[i] // wanted)
            out[i] = min(natural[i], share)
    return out


def print_table(
    console: Console, cols: Sequence[Col], rows: Sequence[Sequence[str]], *, wide: bool = False
) -> None:
    """Print ``rows`` under ``cols``, fitted to ``console``'s width (all in full with ``wide``)."""
    if wide:
        shown, cells = list(range(len(cols))), [list(r) for r in rows]
    else:
        shown, cells = fit(cols, rows, console.width)
    sizes = allot(cols, cells, shown, 10**6 if wide else console.width)
    table = Table(
        *[
            Column(
                cols[i].header,
                justify=cols[i].justify,
                no_wrap=True,
                overflow="ellipsis",
                width=sizes[i],
            )
            for i in shown
        ],
        box=None,
        padding=(0, GAP // 2),
        pad_edge=False,
        show_edge=False,
        header_style="bold",
    )
    for r in cells:
        table.add_row(*(r[i] for i in shown))
    need = sum(sizes.values()) + GAP * (len(shown) - 1)
    if need > console.width:
        # Rich cuts lines to its console's width: a wider console on the same stream (--wide,
        # or key columns that cannot be narrower).
        console = Console(file=console.file, width=need, no_color=console.no_color,
                          force_terminal=console.is_terminal, highlight=False)  # fmt: skip
    console.print(table, markup=False, highlight=False)
