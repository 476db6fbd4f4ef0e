"""``gpufleet submit | status | result | cancel | tasks``: tasks through the HTTP API.

Thin: parse the options, call ``gpufleet.Client``, print. Waiting follows the task's events
and reports its states (queued with its place in the lane, running, the end) on stderr: a Rich
status line on a terminal, plain lines elsewhere; stdout keeps only the result (or JSON).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from gpufleet.cli.context import console, err_console, fail, print_json, reported_errors
from gpufleet.cli.tables import Col, print_table, short_id, short_time, when

if TYPE_CHECKING:
    from gpufleet.client import Client
    from gpufleet.wire import ResultView, TaskView

URL = typer.Option(
    None, "--url", envvar="GPUFLEET_URL", help="API URL (by default http://127.0.0.1:8080)."
)
KEY = typer.Option(None, "--key", envvar="GPUFLEET_API_KEY", help="API key.", show_default=False)
JSON_OUT = typer.Option(False, "--json", help="Print JSON instead of text.")
WIDE = typer.Option(
    False, "--wide", help="Every column, full ids and times (wider than the terminal if need be)."
)
# Left out on a narrow terminal in this order: finished, priority, attempts, created, lane.
TASK_COLUMNS = (
    Col("id", min_width=13, short=short_id), Col("model", min_width=8, fit_width=20),
    Col("lane", keep=1), Col("priority", keep=4), Col("status", min_width=9),
    Col("attempts", keep=3),
    Col("created", keep=2, short=short_time), Col("finished", keep=5, short=short_time),
)  # fmt: skip
OUTPUT = typer.Option(
    None, "-o", "--output", help="Write the result to FILE (a PNG result as an image)."
)


def open_client(url: str | None, key: str | None) -> Client:
    from gpufleet.client import Client

    return Client(url=url, key=key)


def parse_input(text: str) -> Any:
    """``--input``: JSON text, ``@FILE`` to read it from a file, or ``@-`` from stdin."""
    if text.startswith("@"):
        name = text[1:]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text()
        except OSError as e:
            fail(f"invalid_input: cannot read the --input file {name!r}: {e.strerror or e}", 2)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(
            f"invalid_input: --input is not valid JSON ({e.msg}, line {e.lineno} column "
            f"{e.colno}); give JSON text, or @FILE to read it from a file",
            2,
        )


def submit(
    model: str | None = typer.Argument(
        None, help="A deployed model's name (gpufleet models); with --file, the default."
    ),
    input: str | None = typer.Option(
        None, "--input", "-i", help="The input: JSON, or @FILE, or @-."
    ),
    file: Path | None = typer.Option(
        None,
        "--file",
        "-f",
        help="Submit every task of a JSONL file (one object a line, with "
        '"input" and any option), in bulk, and follow them with a progress bar.',
    ),
    lane: str = typer.Option("interactive", "--lane", help="interactive or batch."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first within the lane."),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="A retry with the same key gets the first task back."
    ),
    webhook_url: str | None = typer.Option(
        None, "--webhook-url", help="POSTed the finished task once it ends."
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and print it."),
    no_wait: bool = typer.Option(False, "--no-wait", help="With --file: only submit."),
    timeout: float | None = typer.Option(
        None, "--timeout", min=0, help="With --wait: give up after SECONDS (implies --wait)."
    ),
    output: Path | None = OUTPUT,
    json_out: bool = JSON_OUT,
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Queue a task. Prints its id; with --wait, follows it and prints its result. With
    --file, queues every task of the file and follows them all."""
    if file is not None:
        if input is not None or idempotency_key is not None:
            fail("invalid_input: --file takes no --input or --idempotency-key (each line "
                 "holds its own)", 2)  # fmt: skip
        from gpufleet.cli.bulk import submit_file

        defaults = {"model": model, "lane": lane, "priority": priority,
                    "webhook_url": webhook_url}  # fmt: skip
        with reported_errors(), open_client(url, key) as client:
            submit_file(client, file, {k: v for k, v in defaults.items() if v is not None},
                        wait=not no_wait, timeout=timeout, output=output,
                        json_out=json_out)  # fmt: skip
        return
    if model is None or input is None:
        fail("invalid_input: give MODEL and --input, or --file FILE", 2)
    value = parse_input(input)
    with reported_errors(), open_client(url, key) as client:
        sub = client.submit(
            model, value, lane=lane, priority=priority, idempotency_key=idempotency_key,
            webhook_url=webhook_url,
        )  # fmt: skip
        if not sub.created:
            err_console.print(f"an earlier task has this idempotency key: {sub.id}")
        if not (wait or timeout is not None or output is not None):
            if json_out:
                print_json(sub.model_dump(mode="json"))
            else:
                console.print(sub.id, markup=False, highlight=False)
            return
        view = wait_showing_progress(client, sub.id, timeout)
        show_result(view, output, json_out)


# Off a terminal a queued task's moving place is a line at most this often (its state changes
# are a line each).
PLAIN_POSITION_EVERY_S = 5.0


def place_text(view: TaskView) -> str:
    """``position 3 of 10``; past the count's cap, ``position over 10,000 of over 10,000``."""
    from gpufleet.wire import QUEUE_POSITION_CAP

    def figure(n: int | None) -> str:
        if view.queue_capped and n is not None and n > QUEUE_POSITION_CAP:
            return f"over {QUEUE_POSITION_CAP:,}"
        return f"{n:,}" if n is not None else "?"

    return f"position {figure(view.queue_position)} of {figure(view.queue_length)}"


def progress_text(view: TaskView) -> str:
    """``queued, position 3 of 10`` / ``running (attempt 1 of 3)`` / ``succeeded``."""
    state: str = view.status
    if view.status == "queued" and view.queue_position is not None:
        state += f", {place_text(view)}"
    if view.status == "running":
        state = f"running (attempt {view.attempts} of {view.max_attempts})"
    if view.cancel_requested and not view.finished_at:
        state += ", cancel requested"
    return state


def wait_showing_progress(client: Client, task_id: str, timeout: float | None) -> ResultView:
    """``Client.wait`` reporting each state on stderr: on a terminal a status line that follows
    the task (its place in the lane too) and one line per state left above it; elsewhere plain
    lines, so a log shows where the task was."""
    terminal = err_console.is_terminal
    last: dict[str, Any] = {"status": None, "text": None, "printed": 0.0}

    def line(text: str) -> None:
        err_console.print(f"{task_id} {text}", markup=False, highlight=False)

    def update(view: TaskView, status_line: Any = None) -> None:
        text = progress_text(view)
        if text == last["text"]:
            return
        new_state = view.status != last["status"]
        last["text"], last["status"] = text, view.status
        if status_line is not None:
            status_line.update(f"task {task_id}: {text}")
        took = ""
        if view.finished_at is not None:
            took = f" in {(view.finished_at - view.created_at).total_seconds():.2f} s"
        now = time.monotonic()
        if new_state or (not terminal and now - last["printed"] >= PLAIN_POSITION_EVERY_S):
            last["printed"] = now
            line(text + took)

    if not terminal:
        return client.wait(task_id, timeout=timeout, on_update=update)
    with err_console.status(f"task {task_id}: submitted") as status_line:
        return client.wait(task_id, timeout=timeout, on_update=lambda v: update(v, status_line))


def show_result(view: ResultView, output: Path | None, json_out: bool) -> None:
    """Print (or save) a finished task's result; a failed or cancelled one exits 1."""
    if view.status != "succeeded":
        if json_out:
            print_json(view.model_dump(mode="json"))
        error = f"{view.error.code}: {view.error.message}" if view.error else "no error recorded"
        what = "was cancelled" if view.status == "cancelled" else "failed"
        fail(f"task_{view.status}: task {view.id} {what}: {error}")
    if output is not None:
        size = save_result(view.result, output)
        if json_out:
            print_json({"id": view.id, "status": view.status, "output": str(output),
                        "bytes": size})  # fmt: skip
        else:
            err_console.print(f"wrote {output} ({size} bytes)", markup=False, highlight=False)
    elif json_out:
        print_json(view.model_dump(mode="json"))
    elif isinstance(view.result, str):
        sys.stdout.write(view.result + "\n")
    else:
        print_json(view.result)


def save_result(value: Any, path: Path) -> int:
    """A result with ``png_base64`` is written as the PNG it holds (unless the file is named
    ``.json``); anything else as JSON."""
    png = value.get("png_base64") if isinstance(value, dict) else None
    if isinstance(png, str) and path.suffix.lower() != ".json":
        try:
            data = base64.b64decode(png, validate=True)
        except (binascii.Error, ValueError) as e:
            fail(f"invalid_result: the result's png_base64 is not base64: {e}")
    else:
        data = (json.dumps(value, indent=2) + "\n").encode()
    try:
        path.write_bytes(data)
    except OSError as e:
        fail(f"cannot_write: {path}: {e.strerror or e}")
    return len(data)


def status(
    task_id: str = typer.Argument(help="The task's id."),
    json_out: bool = JSON_OUT,
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """A task's state: lane, attempts, times, and its error if it failed."""
    with reported_errors(), open_client(url, key) as client:
        view = client.get(task_id)
    if json_out:
        print_json(view.model_dump(mode="json"))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_row("id", view.id)
    grid.add_row("model", f"{view.model} {view.version}")
    grid.add_row("lane", f"{view.lane} (priority {view.priority})")
    state = view.status + (", cancel requested" if view.cancel_requested else "")
    if view.queue_position is not None:
        state += f", {place_text(view)} in its lane"
    grid.add_row("status", state)
    grid.add_row("attempts", f"{view.attempts} of {view.max_attempts}")
    for name, at in (("created", view.created_at), ("started", view.started_at),
                       ("finished", view.finished_at)):  # fmt: skip
        grid.add_row(name, when(at))
    if view.error is not None:
        grid.add_row("error", f"{view.error.code}: {view.error.message}")
    if view.status == "succeeded":
        grid.add_row("result", f"gpufleet result {view.id}")
    console.print(grid, markup=False, highlight=False)


def result(
    task_id: str = typer.Argument(help="The task's id."),
    output: Path | None = OUTPUT,
    json_out: bool = JSON_OUT,
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """A finished task's result (task_not_finished while it is queued or running)."""
    with reported_errors(), open_client(url, key) as client:
        view = client.result(task_id)
    show_result(view, output, json_out)


def cancel(
    task_id: str = typer.Argument(help="The task's id."),
    json_out: bool = JSON_OUT,
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Cancel a task: a queued one ends at once, a running one at its next batch."""
    with reported_errors(), open_client(url, key) as client:
        view = client.cancel(task_id)
    if json_out:
        print_json(view.model_dump(mode="json"))
    elif view.status == "cancelled":
        console.print(f"cancelled {view.id}", markup=False, highlight=False)
    else:
        console.print(f"cancel requested: {view.id} is {view.status}; it stops at its next batch",
                      markup=False, highlight=False)  # fmt: skip


def tasks(
    status: str | None = typer.Option(
        None, "--status", help="queued, running, succeeded, failed or cancelled."
    ),
    model: str | None = typer.Option(None, "--model", help="Only this model's tasks."),
    limit: int = typer.Option(50, "--limit", min=1, max=1000, help="At most this many."),
    cursor: str | None = typer.Option(None, "--cursor", help="Where the last page ended."),
    wide: bool = WIDE,
    json_out: bool = JSON_OUT,
    url: str | None = URL,
    key: str | None = KEY,
) -> None:
    """Your tasks, newest first."""
    with reported_errors(), open_client(url, key) as client:
        page = client.tasks(status=status, model=model, limit=limit, cursor=cursor)
    if json_out:
        print_json(page.model_dump(mode="json"))
        return
    if not page.tasks:
        console.print("no tasks")
        return
    rows = [
        [t.id, f"{t.model} {t.version}", t.lane, str(t.priority), t.status,
         f"{t.attempts}/{t.max_attempts}", when(t.created_at), when(t.finished_at)]
        for t in page.tasks
    ]  # fmt: skip
    print_table(console, TASK_COLUMNS, rows, wide=wide)
    if page.next_cursor:
        err_console.print(f"more: --cursor {page.next_cursor}", markup=False, highlight=False)
