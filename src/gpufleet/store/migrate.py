"""Apply Alembic migrations. Safe to call from several processes at once: upgraders serialise on
a PostgreSQL advisory lock, or on SQLite's write lock (``BEGIN IMMEDIATE``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from gpufleet.store.engine import translate_db_errors, write_tx

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed 64-bit number: the key of the advisory lock that serialises upgrades.
_PG_MIGRATION_LOCK = 0x67707566_6C656574


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with translate_db_errors(), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; return the revision it is at afterwards."""
    cfg = _config()
    with write_tx(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine)
