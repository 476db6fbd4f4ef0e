"""Tables at 80 columns (Rich reads ``COLUMNS``): no line wider, and the columns that say what
a row is (id, model, status) keep readable widths; ``--wide`` and ``--json`` keep full ids."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner, Result

from gpufleet.api.keys import KeyStore
from gpufleet.cli.main import app
from gpufleet.cli.tables import Col, fit
from gpufleet.queue import TaskQueue, TaskSpec
from gpufleet.store import LocalBlobStore, create_engine, upgrade
from tests.api.conftest import LiveApi, live_api  # noqa: F401 (the fixture)
from tests.models.registry_helpers import make_scale_model

runner = CliRunner()
LONG_MODEL = "stabilityai-stable-diffusion-xl-base-with-refiner"


def run(*args: str, columns: int = 80, **env: str) -> Result:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(columns), "NO_COLOR": "1", **env})
    assert result.exit_code == 0, result.stderr
    return result


def table_lines(out: str) -> list[str]:
    lines = out.rstrip("\n").splitlines()
    assert len(lines) >= 2, out
    assert max(len(line) for line in lines) <= 80, "\n" + out
    return lines


def column(lines: list[str], header: str) -> list[str]:
    """The cells under ``header`` (the table has no box: cells start where headers start)."""
    head = lines[0]
    start = head.index(header)
    ends = [i for i in range(start + len(header), len(head)) if head[i - 1] == " " != head[i]]
    end = ends[0] - 2 if ends else None
    return [line[start:end].strip() for line in lines[1:]]


def test_fit_shortens_then_drops_the_least_needed_columns() -> None:
    cols = [Col("id", short=lambda v: v[-4:]), Col("model", fit_width=10), Col("extra", keep=1)]
    rows = [["0123456789", "m" * 30, "x" * 20]]
    assert fit(cols, rows, 200) == ([0, 1, 2], [list(rows[0])])
    shown, cells = fit(cols, rows, 40)
    assert shown == [0, 1, 2] and cells[0][0] == "6789"  # shortened first, then it fits
    assert fit(cols, rows, 20)[0] == [0, 1]  # then the lower priority goes


def test_tasks_at_80_columns(live_api: LiveApi) -> None:  # noqa: F811
    ids = [run("submit", "manual", "--input", "{}", "--lane", "batch", GPUFLEET_URL=live_api.url)
           .stdout.strip() for _ in range(2)]  # fmt: skip
    out = run("tasks", "--model", "manual", "--status", "queued", GPUFLEET_URL=live_api.url)
    lines = table_lines(out.stdout)
    assert column(lines, "id")[:2] == ["…" + i[-12:] for i in ids[::-1]]
    assert set(column(lines, "model")) == {"manual 1"}
    assert set(column(lines, "status")) == {"queued"}
    assert "created" in lines[0] and "lane" in lines[0]

    wide = run("tasks", "--model", "manual", "--wide", GPUFLEET_URL=live_api.url).stdout
    assert all(i in wide for i in ids) and "finished" in wide and "priority" in wide
    as_json = run("tasks", "--model", "manual", "--json", GPUFLEET_URL=live_api.url).stdout
    assert {t["id"] for t in json.loads(as_json)["tasks"]} >= set(ids)
    for task_id in ids:
        live_api.queue.cancel(task_id)


def test_queue_stats_and_keys_list_at_80_columns(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/gpufleet.db")
    upgrade(engine)
    queue = TaskQueue(engine, LocalBlobStore(tmp_path / "blobs"))
    queue.submit(TaskSpec(LONG_MODEL, "2026.11.30-rc1", {}, lane="interactive"))
    queue.submit(TaskSpec("digits", "1", {}, lane="batch"))
    keys = KeyStore(engine)
    made = [keys.create("tenant-with-a-rather-long-name", name="the nightly batch job of team x")
            for _ in range(2)]  # fmt: skip
    queue.close()
    engine.dispose()

    stats = table_lines(run("queue", "stats", GPUFLEET_DATA_DIR=str(tmp_path)).stdout)
    models = column(stats, "model")
    assert models[0] == "digits" and models[1].startswith("stabilityai-") and len(models[1]) >= 8
    assert column(stats, "status") == ["queued", "queued"]

    listed = table_lines(run("keys", "list", GPUFLEET_DATA_DIR=str(tmp_path)).stdout)
    assert column(listed, "id") == [info.id for info, _ in made]  # key ids are short: whole
    assert all(len(t) >= 8 for t in column(listed, "tenant"))


def test_models_list_at_80_columns(tmp_path: Path) -> None:
    data = {"GPUFLEET_DATA_DIR": str(tmp_path / "data")}
    model = make_scale_model(tmp_path / "m", version="2026.12.02-with-a-long-build-tag")
    run("models", "package", str(model), "-t", "stable", "-t", "canary", **data)
    lines = table_lines(run("models", "list", **data).stdout)
    assert column(lines, "name") == ["scale"]
    assert column(lines, "version")[0].startswith("2026.12.02")
