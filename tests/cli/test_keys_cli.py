"""``gpufleet keys create | list | revoke`` on a data dir's database, as the server would see it;
and that they never make a database of their own (keys that no server would see)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpufleet.api.keys import KeyStore
from gpufleet.cli.main import app
from gpufleet.store import create_engine, upgrade
from gpufleet.testing import PostgresServer

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def fresh_cli(data_dir: Path) -> Any:
    """``gpufleet keys ...`` on ``data_dir``, whatever is there (nothing, to begin with)."""
    env = {"GPUFLEET_DATA_DIR": str(data_dir), "COLUMNS": "200", "NO_COLOR": "1"}

    def invoke(*args: str) -> Result:
        return runner.invoke(app, ["keys", *args], env=env)

    return invoke


@pytest.fixture
def served(data_dir: Path) -> str:
    """A database as a first ``gpufleet serve`` leaves it: migrated, with an admin key (whose
    id this returns)."""
    engine = create_engine(f"sqlite:///{data_dir}/gpufleet.db")
    upgrade(engine)
    info, _ = KeyStore(engine).create("default", admin=True, name="first admin key")
    engine.dispose()
    return info.id


@pytest.fixture
def cli(fresh_cli: Any, served: str) -> Any:
    """``gpufleet keys ...`` on a data dir a server has used."""
    return fresh_cli


@pytest.fixture
def server_keys(data_dir: Path) -> Iterator[KeyStore]:
    """The key store a server on the same data dir would use."""
    engine = create_engine(f"sqlite:///{data_dir}/gpufleet.db")
    yield KeyStore(engine, cache_ttl_s=0)
    engine.dispose()


def one_error_line(result: Result, prefix: str) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


def test_create_prints_the_key_once_and_the_server_accepts_it(
    cli: Any, server_keys: KeyStore
) -> None:
    made = cli("create", "--tenant", "acme", "--name", "ci bot")
    assert made.exit_code == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("gfk_") and len(key.splitlines()) == 1
    assert "store it now; it cannot be shown again" in made.stderr
    principal = server_keys.verify(key)
    assert principal is not None and (principal.tenant, principal.admin) == ("acme", False)

    listed = cli("list")
    assert listed.exit_code == 0
    assert principal.key_id in listed.stdout and "ci bot" in listed.stdout
    assert key.split("_", 2)[2] not in listed.stdout  # never the secret


def test_create_json(cli: Any, server_keys: KeyStore) -> None:
    made = cli("create", "--tenant", "ops", "--admin", "--json")
    assert made.exit_code == 0, made.stderr
    body = json.loads(made.stdout)
    assert set(body) >= {"id", "tenant", "admin", "name", "created_at", "key"}
    assert (body["tenant"], body["admin"], body["name"]) == ("ops", True, None)
    principal = server_keys.verify(body["key"])
    assert principal is not None and principal.admin


def test_list_json_filters_and_all(cli: Any, served: str) -> None:
    a = json.loads(cli("create", "--tenant", "acme", "--json").stdout)
    b = json.loads(cli("create", "--tenant", "beta", "--json").stdout)
    assert cli("revoke", a["id"]).exit_code == 0

    def ids(*args: str) -> list[str]:
        result = cli("list", "--json", *args)
        assert result.exit_code == 0, result.stderr
        rows = json.loads(result.stdout)
        assert all("key" not in r and "secret_sha256" not in r for r in rows)
        return [r["id"] for r in rows]

    assert ids() == [served, b["id"]]
    assert ids("--all") == [served, a["id"], b["id"]]
    assert ids("--tenant", "acme") == []
    assert ids("--tenant", "acme", "--all") == [a["id"]]

    table = cli("list", "--all")
    assert a["id"] in table.stdout and b["id"] in table.stdout
    assert "revoked" in table.stdout


def test_revoke(cli: Any, server_keys: KeyStore) -> None:
    made = json.loads(cli("create", "--tenant", "acme", "--json").stdout)
    revoked = cli("revoke", made["id"], "--json")
    assert revoked.exit_code == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked_at"] is not None
    assert server_keys.verify(made["key"]) is None
    again = cli("revoke", made["id"])
    assert again.exit_code == 0 and made["id"] in again.stdout


def test_errors_are_one_line(cli: Any) -> None:
    one_error_line(cli("revoke", "0123456789ab"), "not_found:")
    line = one_error_line(cli("create", "--tenant", "bad tenant"), "invalid_input:")
    assert "tenant" in line
    made = json.loads(cli("create", "--tenant", "acme", "--json").stdout)
    line = one_error_line(cli("revoke", made["key"]), "invalid_input:")
    assert made["key"] not in line


def test_empty_list_names_the_database(cli: Any, data_dir: Path) -> None:
    result = cli("list", "--tenant", "nobody")
    assert result.exit_code == 0
    assert f"no API keys in {data_dir / 'gpufleet.db'}" in result.stdout


@pytest.mark.parametrize("args", [["list"], ["list", "--json"], ["revoke", "0123456789ab"]])
def test_list_and_revoke_never_create_a_database(
    fresh_cli: Any, data_dir: Path, args: list[str]
) -> None:
    line = one_error_line(fresh_cli(*args), "database_not_found: no gpufleet database at ")
    assert str(data_dir / "gpufleet.db") in line
    assert "GPUFLEET_DATA_DIR" in line and "GPUFLEET_DATABASE_URL" in line
    assert not data_dir.exists()


def test_create_refuses_a_new_database_unless_told(
    fresh_cli: Any, data_dir: Path, server_keys: KeyStore
) -> None:
    line = one_error_line(fresh_cli("create", "--tenant", "acme"), "database_not_found: ")
    assert str(data_dir / "gpufleet.db") in line and "--init" in line
    assert not (data_dir / "gpufleet.db").exists()

    engine = create_engine(f"sqlite:///{data_dir}/gpufleet.db")
    upgrade(engine)  # there, but no serve ever ran on it: no keys, no tasks
    engine.dispose()
    line = one_error_line(fresh_cli("create", "--tenant", "acme"), "database_unused: ")
    assert "no API keys and no tasks" in line and "--init" in line

    made = fresh_cli("create", "--tenant", "acme", "--init")
    assert made.exit_code == 0, made.stderr
    assert server_keys.verify(made.stdout.strip()) is not None
    assert str(data_dir / "gpufleet.db") in made.stderr  # says where the key went
    assert fresh_cli("create", "--tenant", "beta").exit_code == 0  # a used database now


def test_init_creates_the_database(fresh_cli: Any, data_dir: Path, server_keys: KeyStore) -> None:
    made = fresh_cli("create", "--tenant", "acme", "--init", "--json")
    assert made.exit_code == 0, made.stderr
    assert server_keys.verify(json.loads(made.stdout)["key"]) is not None


@pytest.mark.postgres
def test_a_postgresql_database_without_the_schema_is_refused(
    pg_server: PostgresServer, tmp_path: Path
) -> None:
    url = pg_server.create_database("keys_no_schema")
    env = {"GPUFLEET_DATA_DIR": str(tmp_path), "GPUFLEET_DATABASE_URL": url, "NO_COLOR": "1"}
    for args in (["list"], ["create", "--tenant", "acme"]):
        line = one_error_line(runner.invoke(app, ["keys", *args], env=env), "database_not_found:")
        assert "holds no gpufleet tables" in line and "keys_no_schema" in line
    made = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--init"], env=env)
    assert made.exit_code == 0, made.stderr
    listed = runner.invoke(app, ["keys", "list", "--json"], env=env)
    assert [k["tenant"] for k in json.loads(listed.stdout)] == ["acme"]
