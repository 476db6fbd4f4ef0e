"""The real ``gpufleet`` command in a subprocess: what a shell user or a script sees, exit codes
and output streams included."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import gpufleet
from gpufleet.queue import TaskQueue, TaskSpec, utcnow
from gpufleet.store import LocalBlobStore, create_engine, head_revision, upgrade


def run_cli(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    base |= {"GPUFLEET_DATA_DIR": str(data_dir), "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gpufleet", *args],
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_clean_error_line(proc: subprocess.CompletedProcess[str], prefix: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]


def open_queue(data_dir: Path, clock: Callable[[], datetime] = utcnow) -> TaskQueue:
    """A queue on the same SQLite file the CLI uses by default."""
    engine = create_engine(f"sqlite:///{data_dir}/gpufleet.db")
    return TaskQueue(engine, LocalBlobStore(data_dir / "blobs"), clock=clock)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def migrated(data_dir: Path) -> Path:
    """A data dir whose database is at head (migrated in-process: subprocesses are slow)."""
    engine = create_engine(f"sqlite:///{data_dir}/gpufleet.db")
    upgrade(engine)
    engine.dispose()
    return data_dir


def test_version(data_dir: Path) -> None:
    proc = run_cli(data_dir, "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"gpufleet {gpufleet.__version__}"
    assert not data_dir.exists()  # printing the version touches nothing


def test_db_status_on_a_fresh_data_dir_says_it_is_behind(data_dir: Path) -> None:
    proc = run_cli(data_dir, "db", "status")
    assert proc.returncode == 1
    assert "behind" in proc.stdout
    assert "gpufleet db upgrade" in proc.stdout
    assert head_revision() in proc.stdout
    assert str(data_dir / "gpufleet.db") in proc.stdout and "no database here" in proc.stdout
    assert not data_dir.exists()  # looking created nothing
    status = json.loads(run_cli(data_dir, "db", "status", "--json").stdout)
    assert (status["exists"], status["current"], status["pending"]) == (False, None, True)


def test_db_upgrade_then_status_is_up_to_date(data_dir: Path) -> None:
    proc = run_cli(data_dir, "db", "upgrade", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "database": f"sqlite:///{data_dir / 'gpufleet.db'}", "from": None, "to": head_revision(),
        "head": head_revision(),
    }  # fmt: skip
    assert (data_dir / "gpufleet.db").is_file()
    again = run_cli(data_dir, "db", "upgrade")
    assert again.returncode == 0 and str(data_dir / "gpufleet.db") in again.stdout

    proc = run_cli(data_dir, "db", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["pending"] is False
    assert status["current"] == status["head"] == head_revision()
    assert str(data_dir / "gpufleet.db") in status["database"]


def test_queue_stats_on_an_empty_queue_names_the_database(tmp_path: Path, migrated: Path) -> None:
    # --data-dir wins over GPUFLEET_DATA_DIR (which run_cli sets to elsewhere).
    elsewhere = tmp_path / "elsewhere"
    proc = run_cli(elsewhere, "--data-dir", str(migrated), "queue", "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert not elsewhere.exists()
    text = run_cli(elsewhere, "--data-dir", str(migrated), "queue", "stats")
    assert (
        text.stdout.strip()
        == f"the queue is empty ({migrated / 'gpufleet.db'} (the data dir's database))"
    )


@pytest.mark.parametrize("command", [["queue", "stats"], ["queue", "recover"]], ids=" ".join)
def test_queue_commands_never_create_a_database(data_dir: Path, command: list[str]) -> None:
    """A wrong or missing data dir is said, with the path and how to point elsewhere: an empty
    answer from a database made on the spot would look like the truth."""
    proc = run_cli(data_dir, *command, "--json")
    assert_one_clean_error_line(proc, "database_not_found: no gpufleet database at ")
    assert str(data_dir / "gpufleet.db") in proc.stderr
    for way in ("--data-dir", "GPUFLEET_DATA_DIR", "GPUFLEET_DATABASE_URL"):
        assert way in proc.stderr
    assert proc.stdout == ""
    assert not data_dir.exists()


def test_a_sqlite_file_without_gpufleet_tables_is_refused(tmp_path: Path) -> None:
    stray = tmp_path / "other.db"
    sqlite3.connect(stray).close()  # an empty SQLite file, not gpufleet's
    proc = run_cli(tmp_path, "--database-url", f"sqlite:///{stray}", "queue", "stats")
    assert_one_clean_error_line(proc, "database_not_found: ")
    assert f"sqlite:///{stray} holds no gpufleet tables" in proc.stderr


def test_queue_stats_shows_submitted_tasks(migrated: Path) -> None:
    queue = open_queue(migrated)
    try:
        queue.submit_many(
            [
                TaskSpec("sd-xl", "1.0", {"n": 1}),
                TaskSpec("sd-xl", "1.0", {"n": 2}),
                TaskSpec("sd-xl", "1.0", {"n": 3}),
                TaskSpec("whisper-large", "3", {"n": 4}, lane="batch"),
            ]
        )
        assert len(queue.claim("sd-xl", "1.0", "w1")) == 1
    finally:
        queue.close()
        queue.engine.dispose()

    proc = run_cli(migrated, "queue", "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted((r["model"], r["lane"], r["status"], r["count"]) for r in rows) == [
        ("sd-xl", "interactive", "queued", 2),
        ("sd-xl", "interactive", "running", 1),
        ("whisper-large", "batch", "queued", 1),
    ]
    for r in rows:
        assert isinstance(r["oldest_age_s"], int | float) and r["oldest_age_s"] >= 0

    proc = run_cli(migrated, "queue", "stats")
    assert proc.returncode == 0, proc.stderr
    assert "sd-xl" in proc.stdout and "whisper-large" in proc.stdout
    assert "interactive" in proc.stdout and "running" in proc.stdout


def test_queue_recover_requeues_tasks_whose_lease_expired(migrated: Path) -> None:
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    queue = open_queue(migrated, clock=lambda: an_hour_ago)
    try:
        queue.submit(TaskSpec("sd-xl", "1.0", {"n": 1}))
        (task,) = queue.claim("sd-xl", "1.0", "w1", lease_s=30)
    finally:
        queue.close()
        queue.engine.dispose()

    proc = run_cli(migrated, "queue", "recover", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"requeued": [task.id], "failed": [], "cancelled": []}


@pytest.mark.parametrize(
    "command",
    [["db", "status"]],
    ids=" ".join,
)
def test_unsupported_database_url_is_one_clean_line(data_dir: Path, command: list[str]) -> None:
    proc = run_cli(data_dir, "--database-url", "mysql://x", *command)
    assert_one_clean_error_line(proc, "invalid_input:")
    assert "mysql" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("name", "value"),
    [("GPUFLEET_LEASE_S", "-1")],
)
def test_invalid_setting_is_one_readable_line(data_dir: Path, name: str, value: str) -> None:
    proc = run_cli(data_dir, "queue", "stats", env={name: value})
    assert_one_clean_error_line(proc, "invalid_settings:")
    setting = name.removeprefix("GPUFLEET_").lower()
    assert setting in proc.stderr
    assert proc.stdout == ""
    assert not (data_dir / "gpufleet.db").exists()  # refused before touching anything


@pytest.mark.parametrize("command", [["submit"], ["serve"], ["tasks"]])
def test_help_shows_flags_as_flags(tmp_path: Path, command: list[str]) -> None:
    """A flag (--json, --help) takes no value, so its help row names no type."""
    proc = run_cli(tmp_path, *command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--help" in proc.stdout
    assert "<bool>" not in proc.stdout
    if command == ["submit"]:
        assert "http://127.0.0.1:8080" in proc.stdout  # the URL's default, not eaten as markup
