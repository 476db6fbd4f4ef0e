"""API keys on both databases: create, verify, revoke, list; bad keys all fail alike."""

from __future__ import annotations

import hashlib
import re
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gpufleet.api.keys import KeyStore, Principal
from gpufleet.errors import InvalidInput, NotFound
from gpufleet.store import api_keys
from tests.helpers import FakeClock


@pytest.fixture
def keys(engine: Engine, clock: FakeClock) -> KeyStore:
    return KeyStore(engine, clock=clock)


def test_create_returns_a_key_that_verifies_as_its_tenant(keys: KeyStore, clock: FakeClock) -> None:
    info, key = keys.create("acme", name="ci")
    assert re.fullmatch(r"gfk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    assert key.startswith(f"gfk_{info.id}_")
    assert (info.tenant, info.admin, info.name, info.created_at) == ("acme", False, "ci", clock.now)
    assert keys.verify(key) == Principal("acme", False, info.id)
    admin_info, admin_key = keys.create("ops@example.com", admin=True)
    assert keys.verify(admin_key) == Principal("ops@example.com", True, admin_info.id)


def test_keys_are_unique(keys: KeyStore) -> None:
    made = [keys.create("acme") for _ in range(20)]
    assert len({i.id for i, _ in made}) == len({k for _, k in made}) == 20


def test_only_the_secret_hash_is_stored(keys: KeyStore, engine: Engine) -> None:
    info, key = keys.create("acme", name="label")
    secret = key.removeprefix(f"gfk_{info.id}_")
    with engine.connect() as conn:
        row = conn.execute(sa.select(api_keys)).mappings().one()
    cells = [str(v) for v in row.values()]
    assert not any(secret in c or key in c for c in cells)
    assert row["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret
        lambda k: "gfk_000000000000_" + k.split("_", 2)[2],  # unknown id, real secret
        lambda k: k[4:],  # no prefix
        lambda k: k + "x",  # too long
        lambda k: k.upper(),
        lambda k: "",
        lambda k: "Bearer " + k,
        lambda k: k.replace("_", "-", 1),
    ],
)
def test_bad_keys_verify_as_none(keys: KeyStore, mangle: object) -> None:
    _, key = keys.create("acme")
    assert callable(mangle)
    assert keys.verify(mangle(key)) is None
    assert keys.verify(key) is not None


def test_non_string_keys_verify_as_none(keys: KeyStore) -> None:
    assert keys.verify(None) is None  # type: ignore[arg-type]
    assert keys.verify(b"gfk_x") is None  # type: ignore[arg-type]


def test_revoke_stops_the_key_at_once_in_this_process(keys: KeyStore, clock: FakeClock) -> None:
    info, key = keys.create("acme")
    other_info, other_key = keys.create("acme")
    assert keys.verify(key) is not None  # now cached
    clock.advance(5)
    revoked = keys.revoke(info.id)
    assert revoked.revoked and revoked.revoked_at == clock.now
    assert keys.verify(key) is None
    assert keys.verify(other_key) == Principal("acme", False, other_info.id)
    clock.advance(5)
    again = keys.revoke(info.id)  # harmless, keeps the first revocation time
    assert again.revoked_at == revoked.revoked_at
    assert keys.count_active() == 1


def test_revocation_elsewhere_takes_effect_within_the_cache_ttl(engine: Engine) -> None:
    api = KeyStore(engine, cache_ttl_s=0.3)
    info, key = KeyStore(engine).create("acme")
    assert api.verify(key) is not None
    KeyStore(engine).revoke(info.id)  # e.g. the CLI, another process
    assert api.verify(key) is not None  # still cached
    time.sleep(0.35)
    assert api.verify(key) is None


def test_cache_skips_the_database(keys: KeyStore, engine: Engine) -> None:
    _, key = keys.create("acme")
    assert keys.verify(key) is not None
    with engine.connect() as conn:  # make the table unreadable: only the cache can answer
        conn.execute(sa.update(api_keys).values(secret_sha256="0" * 64))
        conn.commit()
    assert keys.verify(key) is not None
    assert KeyStore(engine).verify(key) is None


def test_revoke_unknown_or_malformed_id(keys: KeyStore) -> None:
    with pytest.raises(NotFound) as nf:
        keys.revoke("0123456789ab")
    assert nf.value.code == "not_found"
    _, key = keys.create("acme")
    with pytest.raises(InvalidInput) as bad:
        keys.revoke(key)  # the whole key, pasted by mistake
    assert key.split("_", 2)[2] not in bad.value.message


def test_list_filters_and_never_shows_secrets(keys: KeyStore, clock: FakeClock) -> None:
    a, _ = keys.create("acme", name="first")
    clock.advance(1)
    b, _ = keys.create("beta", admin=True)
    clock.advance(1)
    c, _ = keys.create("acme")
    keys.revoke(c.id)
    assert [i.id for i in keys.list()] == [a.id, b.id]
    assert [i.id for i in keys.list(include_revoked=True)] == [a.id, b.id, c.id]
    assert [i.id for i in keys.list("acme", include_revoked=True)] == [a.id, c.id]
    assert [i.id for i in keys.list("acme")] == [a.id]
    assert keys.list("nobody") == []
    shown = keys.list()[1].to_dict()
    assert set(shown) == {"id", "tenant", "admin", "name", "created_at", "revoked_at"}
    assert shown["admin"] is True
    assert keys.count_active() == 2


@pytest.mark.parametrize("tenant", ["", "-x", "a b", "x" * 129, None, 5])
def test_tenant_is_validated(keys: KeyStore, tenant: object) -> None:
    with pytest.raises(InvalidInput) as err:
        keys.create(tenant)  # type: ignore[arg-type]
    assert err.value.details["field"] == "tenant"
    if tenant is not None:  # None lists every tenant
        with pytest.raises(InvalidInput):
            keys.list(tenant)  # type: ignore[arg-type]
    assert keys.count_active() == 0


@pytest.mark.parametrize("name", ["", "x" * 129, "a\nb"])
def test_name_is_validated(keys: KeyStore, name: str) -> None:
    with pytest.raises(InvalidInput) as err:
        keys.create("acme", name=name)
    assert err.value.details["field"] == "name"
