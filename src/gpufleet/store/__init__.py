"""Persistence: SQLAlchemy Core tables, migrations, engines (SQLite WAL / PostgreSQL), blobs."""

from gpufleet.store.blobs import BlobStore, LocalBlobStore
from gpufleet.store.engine import create_engine, translate_db_errors
from gpufleet.store.migrate import current_revision, head_revision, upgrade
from gpufleet.store.schema import api_keys, metadata, tasks

__all__ = [
    "BlobStore",
    "LocalBlobStore",
    "api_keys",
    "create_engine",
    "current_revision",
    "head_revision",
    "metadata",
    "tasks",
    "translate_db_errors",
    "upgrade",
]
