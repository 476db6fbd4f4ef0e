"""``gpufleet keys``: create, list and revoke API keys in the server's database.

A new key is printed once; only its hash is kept, so it can never be shown again.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from gpufleet.cli.context import console, err_console, print_json, reported_errors, state

if TYPE_CHECKING:
    from gpufleet.api.keys import KeyStore

app = typer.Typer(
    help="API keys: who may call the HTTP API, and as which tenant.", no_args_is_help=True
)


def open_keys(ctx: typer.Context) -> KeyStore:
    from gpufleet.api.keys import KeyStore
    from gpufleet.store import create_engine, upgrade

    engine = create_engine(state(ctx).settings.resolved_database_url())
    upgrade(engine)
    return KeyStore(engine)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@app.command("create")
def create_cmd(
    ctx: typer.Context,
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts as."),
    admin: bool = typer.Option(False, "--admin", help="May act on every tenant's tasks."),
    name: str | None = typer.Option(None, "--name", help="A label to recognise the key by."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Create a key and print it once."""
    with reported_errors():
        info, key = open_keys(ctx).create(tenant, admin=admin, name=name)
    if json_out:
        print_json(info.to_dict() | {"key": key})
        return
    console.print(key, markup=False, highlight=False)
    err_console.print(
        f"key {info.id} for tenant {info.tenant}{' (admin)' if info.admin else ''}: "
        "store it now; it cannot be shown again",
        markup=False,
        highlight=False,
    )


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    include_revoked: bool = typer.Option(False, "--all", help="Include revoked keys."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Keys, oldest first (ids and labels only: secrets are not kept)."""
    with reported_errors():
        infos = open_keys(ctx).list(tenant, include_revoked=include_revoked)
    if json_out:
        print_json([i.to_dict() for i in infos])
        return
    if not infos:
        console.print("no API keys" + ("" if include_revoked else " (--all shows revoked ones)"))
        return
    table = Table("id", "tenant", "admin", "name", "created", "revoked")
    for i in infos:
        table.add_row(
            i.id,
            i.tenant,
            "yes" if i.admin else "",
            i.name or "",
            _when(i.created_at),
            _when(i.revoked_at),
        )
    console.print(table)


@app.command("revoke")
def revoke_cmd(
    ctx: typer.Context,
    key_id: str = typer.Argument(..., help="The key's id (gpufleet keys list)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Revoke a key; servers stop accepting it within a few seconds (their cache)."""
    with reported_errors():
        info = open_keys(ctx).revoke(key_id)
    if json_out:
        print_json(info.to_dict())
    else:
        console.print(f"revoked key {info.id} of tenant {info.tenant}", markup=False)
