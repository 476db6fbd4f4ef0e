"""File digests: the BLAKE3 that checks on all cores, the SHA-256 chunks that say where a file
differs, and files recorded before BLAKE3 was, which still check by their chunks."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
import warnings
from pathlib import Path

import pytest
from blake3 import blake3

from gpufleet.errors import IntegrityError
from gpufleet.models import integrity


def _file(tmp_path: Path, size: int, name: str = "w.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 1024 * 1024 + 7])
def test_hash_file_records_sha256_blake3_and_chunks_of_the_bytes(tmp_path: Path, size: int) -> None:
    path = _file(tmp_path, size)
    data = path.read_bytes()
    digest = integrity.hash_file(path, chunk_size=1 << 20)
    assert digest.size == size
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.blake3 == blake3(data).hexdigest()
    assert digest.chunks == tuple(
        hashlib.sha256(data[o : o + (1 << 20)]).hexdigest() for o in range(0, size, 1 << 20)
    )
    integrity.verify_file(path, digest)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_naming_its_chunk(tmp_path: Path) -> None:
    path = _file(tmp_path, 5 * 1000)
    digest = integrity.hash_file(path, chunk_size=1000)
    _flip(path, 3 * 1000 + 17)
    with pytest.raises(IntegrityError, match=r"w\.safetensors: chunk 3 \(bytes 3000-\).*tampered"):
        integrity.verify_file(path, digest, name="w.safetensors")


def test_a_flipped_byte_is_refused_by_blake3_alone(tmp_path: Path) -> None:
    path = _file(tmp_path, 4096)
    digest = dataclasses.replace(integrity.hash_file(path), chunks=())
    _flip(path, 4095)
    with pytest.raises(IntegrityError, match="blake3 does not match the recorded digest"):
        integrity.verify_file(path, digest)


@pytest.mark.parametrize("kept", ["chunks", "sha256"])
def test_files_recorded_before_blake3_still_verify(tmp_path: Path, kept: str) -> None:
    path = _file(tmp_path, 3000)
    digest = dataclasses.replace(integrity.hash_file(path, chunk_size=1000), blake3="")
    if kept == "sha256":
        digest = dataclasses.replace(digest, chunks=())
    integrity.verify_file(path, digest)
    _flip(path, 10)
    with pytest.raises(IntegrityError, match="chunk 0" if kept == "chunks" else "sha256"):
        integrity.verify_file(path, digest)


def test_a_recorded_blake3_the_bytes_do_not_have_is_refused(tmp_path: Path) -> None:
    # The chunks match, the BLAKE3 does not: the record contradicts itself, so nothing loads.
    path = _file(tmp_path, 3000)
    digest = dataclasses.replace(integrity.hash_file(path, chunk_size=1000), blake3="0" * 64)
    with pytest.raises(IntegrityError, match="blake3 does not match"):
        integrity.verify_file(path, digest)


def test_a_file_that_vanished_is_an_integrity_error(tmp_path: Path) -> None:
    path = _file(tmp_path, 100)
    digest = integrity.hash_file(path)
    path.unlink()
    with pytest.raises(IntegrityError, match="cannot read"):
        integrity.verify_file(path, digest, name="m@1:w")


def test_background_check_resolves_and_claims_the_file(tmp_path: Path) -> None:
    path = _file(tmp_path, 2 * 1024 * 1024)
    digest = integrity.hash_file(path)
    integrity.expect({path: digest})
    assert integrity.unverified([path]) == [path]
    integrity.check_in_background(path, digest).result(timeout=30)
    assert integrity.unverified([path]) == []
    _flip(path, 0)
    integrity.expect({path: digest})
    failed = integrity.check_in_background(path, digest, name="m@1:w")
    with pytest.raises(IntegrityError, match="m@1:w"):
        failed.result(timeout=30)
    assert integrity.unverified([path]) == [path]


def test_every_digest_is_checked_when_asked(tmp_path: Path) -> None:
    path = _file(tmp_path, 3000)
    digest = integrity.hash_file(path, chunk_size=1000)
    forged = dataclasses.replace(digest, chunks=(digest.chunks[0], "0" * 64, digest.chunks[2]))
    integrity.verify_file(path, forged)  # a load: the BLAKE3 pins the bytes
    with pytest.raises(IntegrityError, match=r"chunk 1 \(bytes 1000-\)"):
        integrity.verify_file(path, forged, every=True)  # a pull: the record contradicts itself
    integrity.verify_file(path, digest, every=True)


def test_a_child_forked_after_hashing_still_hashes(tmp_path: Path) -> None:
    # blake3's thread pool does not survive fork: a child using it would wait forever.
    path = _file(tmp_path, 4 * 1024 * 1024)
    want = integrity.blake3_file(path)  # the pool is up in this process now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only with the right digest
        os._exit(0 if integrity.blake3_file(path) == want else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung hashing")
    assert os.waitstatus_to_exitcode(done[1]) == 0
