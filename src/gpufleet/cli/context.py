"""What every command shares: settings from the root options, JSON output, error printing.

Light on purpose (every ``gpufleet`` call imports it): the settings are read the first time a
command asks for them, so the commands that only talk to the HTTP API, and ``--help``, never
import pydantic-settings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console

from gpufleet.errors import GpufleetError

if TYPE_CHECKING:
    from gpufleet.settings import Settings

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@dataclass
class CliState:
    """The root options; ``settings`` built from them (and the environment) when first used."""

    overrides: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def settings(self) -> Settings:
        return load_settings(**self.overrides)


def state(ctx: typer.Context) -> CliState:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliState)
    return obj


def load_settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from gpufleet.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"invalid_settings: {where}: {first['msg']}")


def fail(line: str, code: int = 1) -> NoReturn:
    err_console.print(line, markup=False, highlight=False)
    raise typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """gpufleet errors become one readable line and exit code 1, never a traceback."""
    try:
        yield
    except GpufleetError as e:
        fail(str(e))


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
