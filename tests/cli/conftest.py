"""Fixtures the CLI tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.cli.main import app


@pytest.fixture
def models_cli(tmp_path: Path) -> Any:
    """``gpufleet models ARGS...`` in-process (Typer's runner), on a data dir of the test's
    own, wide and without colour so its lines can be read."""
    env = {"GPUFLEET_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", "NO_COLOR": "1"}
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["models", *args], env=env)

    return invoke
