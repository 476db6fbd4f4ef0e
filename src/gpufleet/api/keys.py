"""API keys: create, list, revoke and verify ``gfk_<id>_<secret>`` keys, each bound to a tenant.

Only the SHA-256 of the secret is stored (``store.schema.api_keys``). A malformed, unknown or
revoked key all verify as ``None`` alike, so a caller learns nothing about which keys exist.
Successful verifications are cached in-process for ``cache_ttl_s`` (5 s): a key revoked by
another process stops working within that time; one revoked through this ``KeyStore`` at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Engine, RowMapping

from gpufleet.errors import InvalidInput, NotFound
from gpufleet.queue.core import Clock, utcnow
from gpufleet.queue.validation import check_tenant
from gpufleet.store.engine import read_tx, write_tx
from gpufleet.store.schema import api_keys
from gpufleet.store.types import UtcDateTime

k = api_keys.c
# The id is fixed-length hex, so the secret (URL-safe base64, which may hold '_') is the rest.
_KEY = re.compile(r"^gfk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")
# Compared against when the id is unknown, so that path does the same work as a wrong secret.
_NO_HASH = "0" * 64
_CACHE_MAX = 10_000


@dataclass(frozen=True)
class Principal:
    """Who a verified key speaks for."""

    tenant: str
    admin: bool
    key_id: str


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key's record as shown to operators: never the secret or its hash."""

    id: str
    tenant: str
    admin: bool
    name: str | None
    created_at: datetime
    revoked_at: datetime | None = None

    @classmethod
    def from_row(cls, row: RowMapping) -> ApiKeyInfo:
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            admin=bool(row["admin"]),
            name=row["name"],
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
        )

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "admin": self.admin,
            "name": self.name,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_INFO_COLUMNS = (k.id, k.tenant, k.admin, k.name, k.created_at, k.revoked_at)


class KeyStore:
    def __init__(self, engine: Engine, *, clock: Clock = utcnow, cache_ttl_s: float = 5.0) -> None:
        self.engine = engine
        self.clock = clock
        self.cache_ttl_s = cache_ttl_s
        # (key id, secret hash) -> (principal, monotonic expiry). Plain dict operations are
        # atomic under the GIL, which is all the API's threadpool needs.
        self._cache: dict[tuple[str, str], tuple[Principal, float]] = {}

    def create(
        self, tenant: str, *, admin: bool = False, name: str | None = None
    ) -> tuple[ApiKeyInfo, str]:
        """A new key for ``tenant``; the returned key string is the only copy of the secret."""
        check_tenant(tenant)
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise InvalidInput(
                f"name must be 1-128 characters without control characters; got {name!r:.80}",
                field="name",
            )
        for _ in range(3):  # a 48-bit random id collides almost never; retry if it does
            key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
            info = ApiKeyInfo(key_id, tenant, bool(admin), name, self.clock())
            try:
                with write_tx(self.engine) as conn:
                    conn.execute(
                        sa.insert(api_keys).values(
                            id=key_id,
                            tenant=tenant,
                            name=name,
                            admin=info.admin,
                            secret_sha256=_sha256(secret),
                            created_at=info.created_at,
                        )
                    )
            except exc.IntegrityError:
                continue
            return info, f"gfk_{key_id}_{secret}"
        raise RuntimeError("could not pick an unused API key id in 3 tries")

    def list(self, tenant: str | None = None, include_revoked: bool = False) -> list[ApiKeyInfo]:
        """Keys, oldest first; only active ones unless ``include_revoked``."""
        query = sa.select(*_INFO_COLUMNS).order_by(k.created_at, k.id)
        if tenant is not None:
            query = query.where(k.tenant == check_tenant(tenant))
        if not include_revoked:
            query = query.where(k.revoked_at.is_(None))
        with read_tx(self.engine) as conn:
            return [ApiKeyInfo.from_row(r) for r in conn.execute(query).mappings()]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke a key by id; revoking a revoked key changes nothing and returns it."""
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            # Not echoed: people paste the whole key here.
            raise InvalidInput(
                "key_id must be the 12 hex characters of a key's id (gpufleet keys list), "
                "not the key itself",
                field="key_id",
            )
        with write_tx(self.engine) as conn:
            row = (
                conn.execute(
                    sa.update(api_keys)
                    .where(k.id == key_id)
                    .values(
                        revoked_at=sa.func.coalesce(
                            k.revoked_at, sa.literal(self.clock(), UtcDateTime())
                        )
                    )
                    .returning(*_INFO_COLUMNS)
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"no API key with id {key_id}", key_id=key_id)
        for cached in [c for c in tuple(self._cache) if c[0] == key_id]:
            self._cache.pop(cached, None)
        return ApiKeyInfo.from_row(row)

    def cached(self, key: str) -> Principal | None:
        """The principal of ``key`` if it was verified within the cache's lifetime; None
        when the database must be asked (``verify``). Never touches the database, so an event
        loop may call it."""
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return None
        cached = self._cache.get((match[1], _sha256(match[2])))
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        return None

    def verify(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None for anything else (which is not said).

        Database errors propagate (``Unavailable``): an outage must not look like a bad key.
        """
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None:
            return None
        key_id, digest = match[1], _sha256(match[2])
        now = time.monotonic()
        cached = self._cache.get((key_id, digest))
        if cached is not None and cached[1] > now:
            return cached[0]
        with read_tx(self.engine) as conn:
            row = (
                conn.execute(
                    sa.select(k.tenant, k.admin, k.secret_sha256, k.revoked_at).where(
                        k.id == key_id
                    )
                )
                .mappings()
                .first()
            )
        stored = row["secret_sha256"] if row is not None else _NO_HASH
        if not hmac.compare_digest(stored, digest) or row is None or row["revoked_at"]:
            return None
        principal = Principal(row["tenant"], bool(row["admin"]), key_id)
        if self.cache_ttl_s > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()  # bounded: a flood of valid keys only costs re-reads
            self._cache[(key_id, digest)] = (principal, now + self.cache_ttl_s)
        return principal

    def count_active(self) -> int:
        with read_tx(self.engine) as conn:
            query = sa.select(sa.func.count()).where(k.revoked_at.is_(None))
            return int(conn.execute(query.select_from(api_keys)).scalar_one())
