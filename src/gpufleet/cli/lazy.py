"""Commands whose modules are imported only when they run (or show their own help).

``gpufleet --help`` lists every command but runs none, and ``gpufleet submit`` needs neither
NVML's wrappers nor the model registry: the root group holds a ``LazyCommand`` per command,
with the one line ``--help`` lists, and builds the real Typer command on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

try:  # typer 0.29 carries its own copy of Click, and its classes derive from that one's
    from typer import _click as click
    from typer._click.exceptions import MissingParameter
except ImportError:  # older typer: Click itself
    import click  # type: ignore[no-redef]
    from click.exceptions import MissingParameter  # type: ignore[assignment]

__all__ = ["Entry", "LazyCommand", "LazyGroup", "MissingParameter", "click", "lazy_group"]


@dataclass(frozen=True)
class Entry:
    """Where a command lives: ``module:attribute`` (a ``typer.Typer`` group or a command
    function), and the line ``gpufleet --help`` shows for it."""

    target: str
    summary: str


class LazyCommand(TyperCommand):
    """Stands in for a command in its group's listing; parsing its arguments builds the real
    one, which then parses and runs as if it had been there all along."""

    def __init__(self, name: str, entry: Entry) -> None:
        super().__init__(name, help=entry.summary)
        self.entry = entry
        self._real: click.Command | None = None

    def load(self) -> click.Command:
        if self._real is None:
            module, _, attr = self.entry.target.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            if isinstance(obj, typer.Typer):
                self._real = typer.main.get_group(obj)
            else:
                single = typer.Typer()
                single.command(self.name)(obj)
                self._real = typer.main.get_command(single)
        return self._real

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        return self.load().make_context(info_name, args, parent=parent, **extra)


class LazyGroup(TyperGroup):
    """A Typer group whose commands are ``LazyCommand``s, in the order of ``commands``."""

    lazy: dict[str, Entry] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *self.lazy]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.lazy.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        return LazyCommand(cmd_name, entry)


def lazy_group(commands: dict[str, Entry]) -> type[LazyGroup]:
    """A ``LazyGroup`` class for ``typer.Typer(cls=...)`` holding these commands."""
    return type("GpufleetGroup", (LazyGroup,), {"lazy": dict(commands)})
