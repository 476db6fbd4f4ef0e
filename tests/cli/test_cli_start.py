"""What a fresh ``gpufleet`` process imports: the client and ``--help`` must not load the
server (SQLAlchemy, Alembic, FastAPI, Starlette), and each command loads only its own module.

Behaviour, not timing: ``bench/cli_start.py`` measures the times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpufleet.cli.lazy import LazyCommand
from gpufleet.cli.main import COMMANDS

SERVER = ("sqlalchemy", "alembic", "fastapi", "starlette")


def modules_after(code: str) -> set[str]:
    """The top-level packages in ``sys.modules`` after ``code`` ran in a fresh interpreter
    (also when it ends in SystemExit, as a CLI call does)."""
    probe = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: sys.__stderr__.write('MODULES=' + json.dumps(sorted("
        "{m.split('.')[0] for m in sys.modules})) + '\\n'))\n" + code
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    proc = subprocess.run([sys.executable, "-c", probe], env=env | {"COLUMNS": "80"},
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES="))
    return set(json.loads(line.removeprefix("MODULES=")))


def cli(*argv: str) -> str:
    return (
        f"import sys\nsys.argv = ['gpufleet', *{list(argv)!r}]\n"
        "from gpufleet.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
    )


def test_importing_the_client_leaves_the_server_out() -> None:
    loaded = modules_after("import gpufleet.client\nfrom gpufleet import Client, AsyncClient")
    assert "httpx" in loaded and "gpufleet" in loaded  # the probe saw the import
    # httpx's own command line was left out, and can still be imported after.
    assert modules_after(
        "import gpufleet.client, sys\nassert 'httpx._main' not in sys.modules\n"
        "import httpx._main\nassert callable(httpx._main.main)\nimport rich"
    ) >= {"httpx", "rich"}
    assert not loaded & set(SERVER), loaded & set(SERVER)
    assert "pydantic_settings" not in loaded


def test_the_package_exports_without_the_server() -> None:
    loaded = modules_after(
        "from gpufleet import Client, ModelRunner, ModelManifest, NotFound, DatabaseNotFound\n"
        "assert ModelRunner.__name__ == 'ModelRunner' and ModelManifest.__name__ == "
        "'ModelManifest'"
    )
    assert "yaml" in loaded  # the manifest was really imported
    assert not loaded & set(SERVER)


@pytest.mark.parametrize("argv", [["--help"], ["tasks", "--help"], ["submit", "--help"]])
def test_help_imports_neither_the_server_nor_pydantic_settings(argv: list[str]) -> None:
    loaded = modules_after(cli(*argv))
    assert "typer" in loaded
    assert not loaded & {*SERVER, "pydantic_settings"}, loaded & {*SERVER, "pydantic_settings"}


def test_a_command_loads_only_its_own_module() -> None:
    probe = cli("tasks", "--help") + (
        "print(sorted(m for m in sys.modules if m.startswith('gpufleet.cli.')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    loaded = json.loads(out.strip().splitlines()[-1].replace("'", '"'))
    assert "gpufleet.cli.tasks" in loaded
    for other in ("gpufleet.cli.gpus", "gpufleet.cli.serve", "gpufleet.cli.models"):
        assert other not in loaded


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_listed_line_is_the_commands_own_help(name: str) -> None:
    """``gpufleet --help`` lists each command without importing it: its line must say what
    the command's own help says first."""
    lazy = LazyCommand(name, COMMANDS[name])
    real = lazy.load()
    first = " ".join((real.help or "").strip().split("\n\n")[0].split())
    assert lazy.help == first
