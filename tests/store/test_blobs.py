"""The local blob store: content-addressed, atomic, and strict about what a ref looks like."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from gpufleet.errors import InvalidInput, NotFound
from gpufleet.store import LocalBlobStore


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def store(blob_dir: Path) -> LocalBlobStore:
    return LocalBlobStore(blob_dir)


@pytest.mark.parametrize(
    "data", [b"", b"hello", bytes(range(256)) * 4, os.urandom(1 << 20)], ids=len
)
def test_put_then_get_returns_the_same_bytes(store: LocalBlobStore, data: bytes) -> None:
    ref = store.put(data)
    assert store.get(ref) == data
    assert store.exists(ref)
    # A new store on the same directory (another process, a restart) reads it too.
    assert LocalBlobStore(store.root).get(ref) == data


def test_ref_is_the_sha256_of_the_bytes(store: LocalBlobStore) -> None:
    data = b'{"prompt":"a cat"}'
    ref = store.put(data)
    assert ref == "sha256:" + hashlib.sha256(data).hexdigest()
    assert ref == "sha256:" + hashlib.sha256(store.get(ref)).hexdigest()


def test_identical_bytes_are_stored_once(store: LocalBlobStore, blob_dir: Path) -> None:
    refs = {store.put(b"same bytes") for _ in range(3)}
    assert len(refs) == 1
    assert len(files_under(blob_dir)) == 1
    other = store.put(b"other bytes")
    assert other not in refs
    assert len(files_under(blob_dir)) == 2


def test_put_leaves_no_temp_files(store: LocalBlobStore, blob_dir: Path) -> None:
    refs = [store.put(f"blob {i}".encode() * 1000) for i in range(20)]
    store.put(b"blob 0" * 1000)  # a repeat takes the "already there" path
    names = [p.name for p in files_under(blob_dir)]
    assert sorted(names) == sorted(r.split(":", 1)[1] for r in refs)
    assert not [n for n in names if n.startswith(".")]


def test_get_of_a_missing_ref_is_not_found(store: LocalBlobStore) -> None:
    store.put(b"something else")
    ref = "sha256:" + hashlib.sha256(b"never stored").hexdigest()
    assert not store.exists(ref)
    with pytest.raises(NotFound) as info:
        store.get(ref)
    assert info.value.code == "not_found"
    assert ref in str(info.value)


def test_delete_removes_the_blob_and_is_idempotent(store: LocalBlobStore) -> None:
    ref = store.put(b"short-lived")
    store.delete(ref)
    assert not store.exists(ref)
    store.delete(ref)
    with pytest.raises(NotFound):
        store.get(ref)


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "abc",
        "sha256:",
        "sha256:xyz",
        "sha256:" + "A" * 64,  # refs are lower-case hex
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "md5:" + "a" * 32,
        "sha256:../../etc/passwd",
        "sha256:" + "a" * 62 + "/.",
    ],
    ids=repr,
)
@pytest.mark.parametrize("op", ["get", "exists", "delete"])
def test_a_malformed_ref_is_invalid_input(
    store: LocalBlobStore, blob_dir: Path, ref: str, op: str
) -> None:
    store.put(b"keep me")
    before = files_under(blob_dir)
    with pytest.raises(InvalidInput) as info:
        getattr(store, op)(ref)
    assert info.value.code == "invalid_input"
    assert str(info.value).startswith("invalid_input: ")
    assert repr(ref) in info.value.message
    assert files_under(blob_dir) == before
