"""``gpufleet watch``: a live view of the queue through the HTTP API (``GET /v1/queue``).

Per model and lane: queued and running tasks and the oldest queued task's wait; per model: ready
and total workers, and throughput (tasks ended per second between two reads of the server's
finished counter). Redrawn every ``--interval`` seconds until Ctrl-C; ``--once`` prints one
frame (two reads, one interval apart, so that it has a throughput) and ``--json`` that frame as
JSON. A server that stops answering shows as a line in the live view, which goes on trying.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group
from rich.table import Column, Table
from rich.text import Text

from gpufleet.cli.context import console, err_console, print_json, reported_errors
from gpufleet.cli.tasks import JSON_OUT, KEY, URL, open_client
from gpufleet.errors import GpufleetError

if TYPE_CHECKING:
    from gpufleet.client import Client
    from gpufleet.wire import QueueView


@dataclass
class Lane:
    queued: int = 0
    running: int = 0
    oldest_queued_s: float | None = None


@dataclass
class Model:
    lanes: dict[str, Lane] = field(default_factory=dict)
    workers: tuple[int, int] | None = None  # (ready, total)
    finished_per_s: float | None = None


@dataclass
class Frame:
    """What one redraw shows: the last read, and the rate since the read before it."""

    url: str
    at: datetime
    interval_s: float | None
    models: dict[str, Model]

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "at": self.at.isoformat(timespec="seconds"),
            "interval_s": self.interval_s,
            "models": {
                name: {
                    "workers": None if m.workers is None
                    else {"ready": m.workers[0], "total": m.workers[1]},
                    "finished_per_s": m.finished_per_s,
                    "lanes": {lane: vars(x) for lane, x in m.lanes.items()},
                }
                for name, m in self.models.items()
            },
        }  # fmt: skip


@dataclass
class Read:
    view: QueueView
    at: float  # time.monotonic()
    wall: datetime


def read(client: Client) -> Read:
    view = client.queue()
    return Read(view, time.monotonic(), datetime.now().astimezone())


def frame(url: str, now: Read, before: Read | None) -> Frame:
    models: dict[str, Model] = {}
    for row in now.view.depth:
        lane = models.setdefault(row.model, Model()).lanes.setdefault(row.lane, Lane())
        if row.status == "queued":
            lane.queued, lane.oldest_queued_s = row.count, row.oldest_age_s
        else:
            lane.running = row.count
    for name, w in (now.view.workers or {}).items():
        models.setdefault(name, Model()).workers = (w.ready, w.total)
    interval = None if before is None else now.at - before.at
    for name, done in now.view.finished.items():
        m = models.setdefault(name, Model())
        if before is not None and interval:
            # A server restart resets its counter: never a negative rate.
            m.finished_per_s = max(0, done - before.view.finished.get(name, 0)) / interval
    if before is not None and interval:
        for m in models.values():
            if m.finished_per_s is None:
                m.finished_per_s = 0.0
    return Frame(url, now.wall, interval, dict(sorted(models.items())))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render(f: Frame, problem: str | None = None) -> Group:
    """The frame as a table that fits 80 columns (model names are cut, with an ellipsis)."""
    table = Table(
        Column("model", overflow="ellipsis", no_wrap=True, min_width=8, max_width=28),
        Column("lane", no_wrap=True),
        Column("queued", justify="right", no_wrap=True),
        Column("running", justify="right", no_wrap=True),
        Column("oldest wait", justify="right", no_wrap=True),
        Column("workers", justify="right", no_wrap=True),
        Column("done/s", justify="right", no_wrap=True),
        box=None,
        pad_edge=False,
    )
    queued = running = 0
    rate: float | None = None
    for name, m in f.models.items():
        workers = "-" if m.workers is None else f"{m.workers[0]}/{m.workers[1]}"
        per_s = "-" if m.finished_per_s is None else f"{m.finished_per_s:.1f}"
        if m.finished_per_s is not None:
            rate = (rate or 0.0) + m.finished_per_s
        lanes = m.lanes or {"-": Lane()}
        for i, (lane_name, lane) in enumerate(sorted(lanes.items())):
            queued, running = queued + lane.queued, running + lane.running
            cells = [
                name if i == 0 else "", lane_name, str(lane.queued), str(lane.running),
                _age(lane.oldest_queued_s), workers if i == 0 else "", per_s if i == 0 else "",
            ]  # fmt: skip
            table.add_row(*map(Text, cells))  # Text: a name is never read as Rich markup
    head = Text(f"{f.url}  {f.at:%H:%M:%S}  ", no_wrap=True, overflow="ellipsis")
    head.append(f"queued {queued}, running {running}", style="bold")
    head.append(f", {rate:.1f} done/s" if rate is not None else ", done/s after the next read")
    parts: list[Any] = [head, table if f.models else Text("no models, no live tasks")]
    if problem:
        parts.append(Text(problem, style="red"))
    return Group(*parts)


def watch(
    once: bool = typer.Option(False, "--once", help="Print one frame and exit."),
    json_out: bool = JSON_OUT,
    interval: float = typer.Option(
        1.0, "--interval", min=0.1, max=3600, help="Seconds between redraws (and reads)."
    ),
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """A live view of the queue through the API: depth by model and lane, throughput,
    workers, the oldest task's wait. Ctrl-C ends it."""
    try:
        with reported_errors(), open_client(url, key) as client:
            if once or json_out:
                first = read(client)
                time.sleep(interval)
                f = frame(client.url, read(client), first)
                if json_out:
                    print_json(f.to_json())
                else:
                    console.print(render(f))
                return
            live(client, interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a live view ends: exit 0, nothing more to say


def live(client: Client, interval: float) -> None:
    from rich.live import Live

    before = read(client)  # a server that is not there fails here, as one line
    last = frame(client.url, before, None)
    with Live(render(last), console=console, auto_refresh=False) as view:
        # Said once the view is up: from here on Ctrl-C leaves the last frame on the screen.
        err_console.print(f"watching {client.url} every {interval:g} s; Ctrl-C ends",
                          markup=False, highlight=False)  # fmt: skip
        while True:
            time.sleep(interval)
            try:
                now = read(client)
            except GpufleetError as e:
                view.update(render(last, f"{e} (trying again)"), refresh=True)
                continue
            last = frame(client.url, now, before)
            before = now
            view.update(render(last), refresh=True)
