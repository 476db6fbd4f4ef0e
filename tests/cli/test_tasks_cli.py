"""``gpufleet submit | status | result | cancel | tasks`` against the real app on loopback (the
``live_api`` fixture): output, ``--json``, ``-o`` files, and one clean error line with exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.cli.main import app
from tests.api.conftest import PNG, LiveApi, live_api  # noqa: F401 (the fixture)
from tests.integration.serve_helpers import free_port

runner = CliRunner()


@pytest.fixture
def cli(live_api: LiveApi, tmp_path: Path) -> Any:  # noqa: F811
    env = {"GPUFLEET_URL": live_api.url, "GPUFLEET_DATA_DIR": str(tmp_path), "COLUMNS": "200"}

    def invoke(*args: str) -> Result:
        return runner.invoke(app, list(args), env=env)

    return invoke


def one_error_line(result: Result, prefix: str, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, (result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_submit_prints_the_id_and_status_shows_the_task(cli: Any) -> None:
    submitted = cli("submit", "idle", "--input", '{"text": "a"}', "--priority", "7")
    assert submitted.exit_code == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert task_id and len(task_id.split()) == 1

    shown = cli("status", task_id, "--json")
    assert shown.exit_code == 0
    view = json.loads(shown.stdout)
    assert (view["id"], view["model"], view["status"], view["priority"]) == (
        task_id, "idle", "queued", 7,
    )  # fmt: skip

    text = cli("status", task_id)
    assert text.exit_code == 0
    assert task_id in text.stdout and "queued" in text.stdout and "priority 7" in text.stdout
    assert f"position {view['queue_position']} of {view['queue_length']} in its lane" in text.stdout


def test_submit_json_and_options(cli: Any) -> None:
    out = cli("submit", "idle", "--input", "[1, 2]", "--lane", "batch", "--idempotency-key",
              "cli-key-1", "--webhook-url", "http://127.0.0.1:9/hook", "--json")  # fmt: skip
    assert out.exit_code == 0, out.stderr
    sub = json.loads(out.stdout)
    assert (sub["model"], sub["status"], sub["created"]) == ("idle", "queued", True)
    again = cli("submit", "idle", "--input", "[1, 2]", "--lane", "batch", "--idempotency-key",
                "cli-key-1", "--webhook-url", "http://127.0.0.1:9/hook", "--json")  # fmt: skip
    assert json.loads(again.stdout)["id"] == sub["id"]
    assert "idempotency key" in again.stderr
    view = json.loads(cli("status", sub["id"], "--json").stdout)
    assert view["lane"] == "batch" and view["webhook_url"] == "http://127.0.0.1:9/hook"


def progress_lines(stderr: str) -> tuple[str, list[str]]:
    """(the task id, its states) from ``submit --wait``'s plain lines (stderr no terminal)."""
    lines = stderr.strip().splitlines()
    task_id = lines[0].split()[0]
    assert all(line.startswith(f"{task_id} ") for line in lines), stderr
    return task_id, [line.removeprefix(f"{task_id} ") for line in lines]


def test_submit_wait_prints_the_result(cli: Any) -> None:
    done = cli("submit", "echo", "--input", '{"text": "hello"}', "--wait")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout) == {"echo": "hello"}  # stdout: the result alone
    # Off a terminal, stderr has a plain line per state, the end with its time.
    _, states = progress_lines(done.stderr)
    assert states[-1].startswith("succeeded in ") and states[-1].endswith(" s")
    assert set(states[:-1]) <= {"queued", "running (attempt 1 of 3)"} | {
        s for s in states if s.startswith("queued, position ")
    }

    as_json = cli("submit", "echo", "--input", '{"text": "j"}', "--wait", "--json")
    assert as_json.exit_code == 0
    body = json.loads(as_json.stdout)
    assert body["status"] == "succeeded" and body["result"] == {"echo": "j"}


def test_submit_wait_saves_a_png_result(cli: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    done = cli("submit", "echo", "--input", '{"png": true}', "--wait", "-o", str(out))
    assert done.exit_code == 0, done.stderr
    assert out.read_bytes() == PNG
    assert f"wrote {out}" in done.stderr


def test_result_writes_png_or_json_files(cli: Any, tmp_path: Path) -> None:
    task_id = cli("submit", "echo", "--input", '{"png": true}', "--json", "--wait", "--timeout",
                  "20")  # fmt: skip
    task_id = json.loads(task_id.stdout)["id"]
    png = tmp_path / "image.png"
    saved = cli("result", task_id, "-o", str(png), "--json")
    assert saved.exit_code == 0, saved.stderr
    assert json.loads(saved.stdout) == {
        "id": task_id, "status": "succeeded", "output": str(png), "bytes": len(PNG),
    }  # fmt: skip
    assert png.read_bytes() == PNG

    as_json = tmp_path / "result.json"
    assert cli("result", task_id, "-o", str(as_json)).exit_code == 0
    assert "png_base64" in json.loads(as_json.read_text())

    shown = cli("result", task_id, "--json")
    assert json.loads(shown.stdout)["status"] == "succeeded"


def test_input_from_a_file(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"text": "from a file"}')
    done = cli("submit", "echo", "--input", f"@{tmp_path / 'in.json'}", "--wait")
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout) == {"echo": "from a file"}


def test_bad_input_is_one_line_and_exit_2(cli: Any, tmp_path: Path) -> None:
    line = one_error_line(cli("submit", "echo", "--input", "{nope"), "invalid_input: ", 2)
    assert "not valid JSON" in line
    missing = tmp_path / "missing.json"
    line = one_error_line(cli("submit", "echo", "--input", f"@{missing}"), "invalid_input: ", 2)
    assert "missing.json" in line


def test_server_errors_are_one_line_and_exit_1(cli: Any) -> None:
    one_error_line(cli("status", "t_nope"), "not_found: ")
    one_error_line(cli("submit", "no-such-model", "--input", "{}"), "not_found: ")
    one_error_line(cli("submit", "echo", "--input", "{}", "--priority", "1000"),
                   "invalid_input: body.priority")  # fmt: skip
    queued = cli("submit", "idle", "--input", "{}").stdout.strip()
    one_error_line(cli("result", queued), "task_not_finished: ")


def error_after_progress(result: Result, prefix: str) -> str:
    """``submit --wait``: the states as plain lines, then the error as one last line."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    *states, last = result.stderr.strip().splitlines()
    assert last.startswith(prefix), result.stderr
    progress_lines("\n".join(states))
    return last


def test_a_failed_task_exits_1_with_its_error(cli: Any) -> None:
    out = cli("submit", "echo", "--input", '{"fail": "no dogs"}', "--wait")
    line = error_after_progress(out, "task_failed: ")
    assert "bad_input: no dogs" in line


def test_wait_timeout(cli: Any) -> None:
    line = error_after_progress(cli("submit", "idle", "--input", "{}", "--timeout", "0.3"),
                                "wait_timeout: ")  # fmt: skip
    assert "queued" in line


def test_submit_wait_shows_the_place_in_the_lane(cli: Any, live_api: LiveApi) -> None:  # noqa: F811
    """The model has no worker: the task waits, with its place among the lane's tasks."""
    ahead = [cli("submit", "idle", "--input", "{}", "--lane", "batch", "--priority", "40")
             .stdout.strip() for _ in range(2)]  # fmt: skip
    queued = sum(r.count for r in live_api.queue.stats().depth
                 if (r.model, r.lane, r.status) == ("idle", "batch", "queued"))  # fmt: skip
    out = cli("submit", "idle", "--input", "{}", "--lane", "batch", "--priority", "40",
              "--timeout", "0.5")  # fmt: skip
    error_after_progress(out, "wait_timeout: ")
    # Third: behind the two of its priority, ahead of the lower priorities of other tests.
    waited, states = progress_lines(out.stderr.strip().rsplit("\n", 1)[0])
    assert states == [f"queued, position 3 of {queued + 1}"]
    for task_id in [*ahead, waited]:
        live_api.queue.cancel(task_id)


def test_cancel(cli: Any) -> None:
    task_id = cli("submit", "idle", "--input", "{}").stdout.strip()
    out = cli("cancel", task_id)
    assert out.exit_code == 0 and out.stdout.strip() == f"cancelled {task_id}"
    again = cli("cancel", task_id, "--json")
    assert json.loads(again.stdout)["status"] == "cancelled"
    result = cli("result", task_id)
    one_error_line(result, "task_cancelled: ")

    finished = cli("submit", "echo", "--input", '{"text": "x"}', "--json", "--wait")
    one_error_line(cli("cancel", json.loads(finished.stdout)["id"]), "task_finished: ")


def test_tasks_lists_json_and_a_table(cli: Any) -> None:
    ids = [cli("submit", "manual", "--input", json.dumps({"n": i})).stdout.strip()
           for i in range(3)]  # fmt: skip
    page = cli("tasks", "--model", "manual", "--limit", "2", "--json")
    assert page.exit_code == 0
    body = json.loads(page.stdout)
    assert [t["id"] for t in body["tasks"]] == ids[::-1][:2]
    assert body["next_cursor"]
    rest = json.loads(cli("tasks", "--model", "manual", "--cursor", body["next_cursor"],
                          "--json").stdout)  # fmt: skip
    assert [t["id"] for t in rest["tasks"]] == [ids[0]]

    table = cli("tasks", "--model", "manual", "--status", "queued")
    assert table.exit_code == 0
    for header in ("id", "model", "lane", "priority", "status", "attempts", "created"):
        assert header in table.stdout
    for task_id in ids:
        assert task_id in table.stdout
    assert cli("tasks", "--model", "nothing-here").stdout.strip() == "no tasks"


def test_an_unreachable_server_is_one_line(cli: Any) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(cli("status", "t_x", "--url", url), "unavailable: ")
    assert url in line


def test_the_real_command_in_a_subprocess(live_api: LiveApi, tmp_path: Path) -> None:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env |= {"GPUFLEET_URL": live_api.url, "GPUFLEET_API_KEY": "gfk_not_printed",
            "GPUFLEET_DATA_DIR": str(tmp_path), "NO_COLOR": "1"}  # fmt: skip
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "gpufleet", "submit", "echo", "--input", '{"png": true}',
         "--wait", "-o", str(out)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == PNG
    assert "gfk_not_printed" not in proc.stdout + proc.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "gpufleet", "status", "t_nope"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip().startswith("not_found: ")
    assert "Traceback" not in bad.stderr


def test_a_place_past_the_apis_count_reads_over_it() -> None:
    from datetime import UTC, datetime

    from gpufleet.cli.tasks import place_text, progress_text
    from gpufleet.wire import TaskView

    base: dict[str, Any] = {
        "id": "t1", "tenant": "default", "model": "m", "version": "1", "lane": "batch",
        "priority": 0, "status": "queued", "attempts": 0, "max_attempts": 3,
        "cancel_requested": False, "created_at": datetime.now(UTC), "started_at": None,
        "finished_at": None, "error": None,
    }  # fmt: skip
    exact = TaskView(**base, queue_position=1234, queue_length=5678, queue_capped=False)
    assert progress_text(exact) == "queued, position 1,234 of 5,678"
    deep = TaskView(**base, queue_position=10_001, queue_length=10_001, queue_capped=True)
    assert place_text(deep) == "position over 10,000 of over 10,000"
    front = TaskView(**base, queue_position=2, queue_length=10_001, queue_capped=True)
    assert place_text(front) == "position 2 of over 10,000"
