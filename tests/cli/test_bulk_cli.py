# ruff: noqa: F811  (pytest fixtures imported from their modules, then taken as arguments)
"""``gpufleet submit --file tasks.jsonl`` against the real app on loopback: bulk requests,
a progress bar until every task ended, results to a file, refusals and bad files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import LiveApi, live_api  # noqa: F401 (the fixture)
from tests.cli.test_tasks_cli import cli  # noqa: F401 (the fixture)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_submit_file_follows_every_task_and_writes_results(cli: Any, tmp_path: Path) -> None:
    tasks = _jsonl(tmp_path / "t.jsonl", [{"input": {"text": str(i)}} for i in range(25)])
    out = tmp_path / "results.jsonl"
    r = cli("submit", "echo", "--file", str(tasks), "-o", str(out), "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    doc = json.loads(r.stdout)
    assert doc["counts"] == {"succeeded": 25}
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(25))
    assert [x["result"] for x in lines] == [{"echo": str(i)} for i in range(25)]


def test_submit_file_reports_refused_tasks_and_exits_1(cli: Any, tmp_path: Path) -> None:
    rows = [{"input": {"text": "a"}}, {"model": "nope", "input": {}}, {"input": {"text": "b"}}]
    r = cli("submit", "echo", "--file", str(_jsonl(tmp_path / "t.jsonl", rows)))
    assert r.exit_code == 1
    assert "3 tasks: 1 refused, 2 succeeded" in r.stderr
    assert "task 2: not_found" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_submit_file_no_wait_only_submits(
    cli: Any,
    live_api: LiveApi,
    tmp_path: Path,
) -> None:
    rows = [{"model": "idle", "input": {"text": str(i)}, "lane": "batch"} for i in range(3)]
    r = cli("submit", "--file", str(_jsonl(tmp_path / "t.jsonl", rows)), "--no-wait", "--json")
    assert r.exit_code == 0, r.stderr
    ids = [t["id"] for t in json.loads(r.stdout)["tasks"]]
    assert all(t.lane == "batch" for t in live_api.queue.get_many(ids).values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", "line 1 is not JSON"),
        ('{"text": 1}\n', 'line 1 must be an object with "input"'),
        ('{"input": 1, "colour": 2}\n', "unknown field 'colour'"),
        ("\n\n", "holds no tasks"),
    ],
)
def test_a_bad_file_is_one_line_and_exit_2(
    cli: Any, tmp_path: Path, content: str, message: str
) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    r = cli("submit", "echo", "--file", str(f))
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_a_task_without_a_model_is_refused_before_sending(cli: Any, tmp_path: Path) -> None:
    r = cli("submit", "--file", str(_jsonl(tmp_path / "t.jsonl", [{"input": 1}])))
    assert r.exit_code == 2 and "names no model" in r.stderr


def test_file_and_input_together_are_refused(cli: Any, tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"input": 1}])
    r = cli("submit", "echo", "--file", str(f), "--input", "{}")
    assert r.exit_code == 2 and "--file takes no --input" in r.stderr
