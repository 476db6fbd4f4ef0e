"""``gpufleet submit --file tasks.jsonl``: many tasks in bulk requests, followed to the end.

One JSON object a line: ``{"input": ...}`` plus any of ``model``, ``lane``, ``priority``,
``idempotency_key``, ``webhook_url``, ``max_attempts`` (the command line's model and options
are the defaults). Every line is checked before anything is sent; then the tasks go in bulk
requests (``POST /v1/tasks/batch``, 1,000 a request, each one durable commit) and a Rich
progress bar follows them until all have ended (``--no-wait``: only submit). Exit code 1 when
any task was refused or did not succeed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gpufleet.cli.context import err_console, fail, print_json

if TYPE_CHECKING:
    from gpufleet.client import Client

_OPTIONS = ("model", "lane", "priority", "idempotency_key", "webhook_url", "max_attempts")
POLL_S = 0.5


def read_tasks(path: Path, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The file's tasks with the defaults filled in; one readable line (exit 2) for the first
    bad line."""
    try:
        text = path.read_text() if str(path) != "-" else __import__("sys").stdin.read()
    except OSError as e:
        fail(f"invalid_input: cannot read {path}: {e.strerror or e}", 2)
    tasks: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"invalid_input: {path} line {n} is not JSON ({e.msg}, column {e.colno})", 2)
        if not isinstance(doc, dict) or "input" not in doc:
            fail(f'invalid_input: {path} line {n} must be an object with "input"', 2)
        unknown = set(doc) - {"input", *_OPTIONS}
        if unknown:
            fail(
                f"invalid_input: {path} line {n} has an unknown field {sorted(unknown)[0]!r}; "
                f"known: input, {', '.join(_OPTIONS)}",
                2,
            )
        task = {**defaults, **doc}
        if not task.get("model"):
            fail(f"invalid_input: {path} line {n} names no model; give MODEL or a model field", 2)
        tasks.append(task)
    if not tasks:
        fail(f"invalid_input: {path} holds no tasks", 2)
    return tasks


def submit_file(
    client: Client,
    path: Path,
    defaults: dict[str, Any],
    *,
    wait: bool,
    timeout: float | None,
    output: Path | None,
    json_out: bool,
) -> None:
    tasks = read_tasks(path, defaults)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console, transient=not err_console.is_terminal) as bar:
        sent = bar.add_task("submitted", total=len(tasks))
        items = []
        for i in range(0, len(tasks), 1000):
            items.extend(client.submit_many(tasks[i : i + 1000]))
            bar.update(sent, completed=len(items))
        ids = [it.id for it in items if it.id is not None]
        states: dict[str, str] = {tid: "queued" for tid in ids}
        if wait and ids:
            done = bar.add_task("finished", total=len(ids))
            deadline = None if timeout is None else time.monotonic() + timeout
            open_ids = list(ids)
            while open_ids:
                for view in client.get_many(open_ids):
                    states[view.id] = view.status
                open_ids = [t for t in open_ids if states[t] not in _ENDED]
                bar.update(done, completed=len(ids) - len(open_ids))
                if not open_ids or (deadline is not None and time.monotonic() > deadline):
                    break
                time.sleep(POLL_S)
    rows = []
    for it in items:
        row: dict[str, Any] = {"index": it.index, "id": it.id}
        if it.error is not None:
            row |= {"status": "refused", "error": it.error}
        else:
            row["status"] = states.get(it.id or "", "queued")
        rows.append(row)
    if output is not None:
        _write_results(client, rows, output)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    if json_out:
        print_json({"counts": counts, "tasks": rows})
    else:
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        err_console.print(f"{len(rows)} tasks: {summary}", markup=False, highlight=False)
        for row in rows:
            if row["status"] == "refused":
                err = row["error"]
                err_console.print(
                    f"task {row['index'] + 1}: {err.get('code')}: {err.get('message')}",
                    markup=False, highlight=False,
                )  # fmt: skip
    if any(r["status"] != "succeeded" for r in rows) and (wait or counts.get("refused")):
        raise SystemExit(1)


_ENDED = frozenset({"succeeded", "failed", "cancelled"})


def _write_results(client: Client, rows: list[dict[str, Any]], output: Path) -> None:
    """One JSON line per task, in the file's order: its id, status, and result or error."""
    try:
        with output.open("w") as out:
            for row in rows:
                line = dict(row)
                if row["status"] in _ENDED and row["id"]:
                    view = client.result(row["id"])
                    line["result"] = view.result
                    if view.error is not None:
                        line["error"] = view.error.model_dump()
                out.write(json.dumps(line) + "\n")
    except OSError as e:
        fail(f"cannot_write: {output}: {e.strerror or e}")
