"""File digests that can be checked in parallel, and the record of what a process verified.

A file's identity is its SHA-256 (what OCI registries and ``sha256sum`` use). One SHA-256 runs
on one core at about 1.2-2 GB/s, slower than a warm page cache or an NVMe disk gives bytes,
so a 10 GB weights file would take longer to check than to load. Each file therefore also
records digests that check faster, covered by the artifact's manifest digest and so as
trustworthy as the whole-file SHA-256:

- ``blake3``: the file's BLAKE3, a tree hash that runs on all cores at once (1 GB from the page
  cache in 0.021 s on the 16-core H100 machine, where 16 SHA-256 chunks take 0.10 s);
- ``chunks``: the SHA-256 of each ``CHUNK_SIZE`` piece, which a reader can check on the way
  (``gpufleet.models.weights``) and which names the piece that differs when a check fails.

``expect`` / ``claim_verified`` let a registry hand a loader the digests of the files it is
about to load: a loader that reads a file anyway (``gpufleet.models.weights``) checks its
chunks on the way and marks the file verified; the registry checks whatever was not.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3 as _Blake3

from gpufleet.errors import IntegrityError

CHUNK_SIZE = 64 * 1024 * 1024
_READ = 8 * 1024 * 1024  # hashlib releases the GIL on buffers this large


@dataclass(frozen=True)
class FileDigest:
    """``sha256`` and ``blake3`` of the whole file, ``chunks`` the SHA-256 of each
    ``chunk_size`` piece. Files recorded by older versions have no ``blake3`` ("")."""

    sha256: str  # hex, no "sha256:" prefix
    size: int
    chunk_size: int = CHUNK_SIZE
    chunks: tuple[str, ...] = field(default=())
    blake3: str = ""  # hex

    def chunk_ranges(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of each chunk, in order."""
        return [
            (start, min(self.chunk_size, self.size - start))
            for start in range(0, self.size, self.chunk_size)
        ]


def default_threads() -> int:
    """Threads that read and hash a file: one per core, at most 16."""
    return max(1, min(16, os.cpu_count() or 1))


def _hash_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        remaining = length
        while remaining:
            block = f.read(min(_READ, remaining))
            if not block:
                raise IntegrityError(f"{path} is shorter than recorded", path=str(path))
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def blake3_file(path: str | Path) -> str:
    """The BLAKE3 of a file, hashed on all cores from a memory map (the GIL released).

    Reading through a map is what makes it fast (1 GB in 0.02 s from the page cache), and it
    has the price of every mapped read, safetensors' own loader included: a file cut short
    while it is hashed, or a disk read error, kills the process with SIGBUS (which the
    supervisor reports as such) instead of raising. Registry blobs are read-only and
    replaced only by rename, which leaves a mapping intact.

    In a child forked after this process hashed on several threads, the hashing threads do
    not exist: there it hashes on one thread rather than wait for them forever.
    """
    file = Path(path)
    hasher = _Blake3(max_threads=1 if _forked_after_threads else _Blake3.AUTO)
    fd = os.open(file, os.O_RDONLY)
    try:  # from disk, read ahead in large requests rather than fault by fault
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    hasher.update_mmap(file)
    global _threads_started
    _threads_started = True
    return hasher.hexdigest()


_threads_started = False  # this process hashed on blake3's thread pool
_forked_after_threads = False  # it is a fork of one that had


def _after_fork_in_child() -> None:
    global _forked_after_threads
    _forked_after_threads = _forked_after_threads or _threads_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def hash_file(path: str | Path, *, chunk_size: int = CHUNK_SIZE) -> FileDigest:
    """The whole-file SHA-256 (one pass), and beside it the chunk digests and the BLAKE3."""
    file = Path(path)
    size = file.stat().st_size
    ranges = [(s, min(chunk_size, size - s)) for s in range(0, size, chunk_size)]
    with ThreadPoolExecutor(default_threads()) as pool:
        chunk_futures = [pool.submit(_hash_range, file, o, n) for o, n in ranges]
        tree = pool.submit(blake3_file, file)
        whole = _hash_range(file, 0, size)
        chunks = tuple(f.result() for f in chunk_futures)
    return FileDigest(whole, size, chunk_size, chunks, tree.result())


def chunk_digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def verify_file(
    path: str | Path, expected: FileDigest, *, name: str | None = None, every: bool = False
) -> None:
    """Raise ``IntegrityError`` unless ``path`` has exactly the recorded bytes.

    Checks the BLAKE3 when there is one, else the chunk digests, both on all cores, else the
    whole-file SHA-256. When the BLAKE3 differs, the chunks (if any) say where. ``every``
    checks the chunks beside a matching BLAKE3 too, so a record that contradicts itself is
    refused (a pull, ``models verify``); a load needs only one digest that pins the bytes.
    """
    file = Path(path)
    label = name or str(file)
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise IntegrityError(f"{label}: cannot read: {exc}", path=label) from exc
    check_size(label, size, expected)
    try:
        tree_ok = None  # whether the BLAKE3 matched; None: none recorded
        if expected.blake3:
            tree_ok = blake3_file(file) == expected.blake3
            if tree_ok and not (every and expected.chunks):
                return
        elif not expected.chunks:
            if _hash_range(file, 0, size) == expected.sha256:
                return
            raise mismatch(label, "sha256")
        if expected.chunks:  # the check itself, or where the file differs from its BLAKE3
            with ThreadPoolExecutor(default_threads()) as pool:
                got = pool.map(lambda r: _hash_range(file, *r), expected.chunk_ranges())
                check_chunks(label, expected, dict(enumerate(got)))
            if tree_ok is not False:
                return
    except OSError as exc:
        raise IntegrityError(f"{label}: cannot read: {exc}", path=label) from exc
    raise mismatch(label, "blake3")


def check_in_background(
    path: str | Path, expected: FileDigest, *, name: str | None = None
) -> Future[None]:
    """``verify_file`` on a thread of its own (the hash still runs on all cores), then
    ``claim_verified``; the future raises ``IntegrityError`` on a mismatch."""
    file = Path(path)
    verdict: Future[None] = Future()

    def check() -> None:
        try:
            verify_file(file, expected, name=name)
            claim_verified(file)
        except BaseException as exc:  # the waiter gets it, whatever it is
            verdict.set_exception(exc)
        else:
            verdict.set_result(None)

    # A daemon: a process that exits (or is told to) does not wait for a check nobody awaits.
    threading.Thread(target=check, name="integrity-check", daemon=True).start()
    return verdict


def check_size(label: str, size: int, expected: FileDigest) -> None:
    """Raise ``IntegrityError`` unless a file of ``size`` bytes can match ``expected``."""
    if size != expected.size:
        raise IntegrityError(
            f"{label}: size {size} bytes, recorded {expected.size}: the file was changed "
            "or truncated; refusing to load it",
            path=label,
        )
    if expected.chunks and len(expected.chunks) != len(expected.chunk_ranges()):
        raise IntegrityError(f"{label}: chunk list does not match its size", path=label)


def check_chunks(label: str, expected: FileDigest, got: dict[int, str]) -> None:
    """Raise ``IntegrityError`` naming the first chunk whose digest in ``got`` (by index)
    is missing or differs from the recorded one."""
    bad = [i for i, want in enumerate(expected.chunks) if got.get(i) != want]
    if bad:
        start = expected.chunk_ranges()[bad[0]][0]
        raise mismatch(label, f"chunk {bad[0]} (bytes {start}-)")


def mismatch(label: str, where: str) -> IntegrityError:
    return IntegrityError(
        f"{label}: {where} does not match the recorded digest: the stored file is corrupted "
        "or was tampered with; refusing to load it (pull or package the model again)",
        path=label,
    )


# Which files this process is expected to verify, and which it has.
_lock = threading.Lock()
_expected: dict[Path, FileDigest] = {}
_verified: set[Path] = set()
_labels: dict[Path, str] = {}


def expect(files: dict[Path, FileDigest], labels: dict[Path, str] | None = None) -> None:
    """Record the digests of files about to be loaded, and the names errors should give them
    (``model@1.0:weights.safetensors`` rather than a blob path)."""
    with _lock:
        for path, digest in files.items():
            _expected[path.resolve()] = digest
            _verified.discard(path.resolve())
            if labels and path in labels:
                _labels[path.resolve()] = labels[path]


def label_of(path: str | Path) -> str:
    """The name ``expect`` gave ``path``, else the path."""
    with _lock:
        return _labels.get(Path(path).resolve(), str(path))


def expected_digest(path: str | Path) -> FileDigest | None:
    """The recorded digest of ``path``, if a registry gave one: a loader checks it while reading."""
    with _lock:
        return _expected.get(Path(path).resolve())


def claim_verified(path: str | Path) -> None:
    """``path`` was read and matched its recorded digests (by a loader, a prefetch or a check)."""
    with _lock:
        _verified.add(Path(path).resolve())


def unverified(paths: Iterable[Path]) -> list[Path]:
    """Those of ``paths`` nobody verified since ``expect``."""
    with _lock:
        return [p for p in paths if p.resolve() not in _verified]
