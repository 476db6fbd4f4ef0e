"""Weights files: a safetensors loader bound by disk and PCIe bandwidth, a streaming writer,
and a prefetcher that reads (and verifies) a file while the process is still importing torch.

The loader parses the header itself, reads the data section with several threads (``pread``)
into one device buffer (through a ring of pinned buffers and copies on CUDA streams), and
checks the file's recorded chunk digests (``gpufleet.models.integrity``) as the bytes pass.
Tensors are views into that one buffer. torch is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.errors import IntegrityError, InvalidInput
from gpufleet.models import integrity

if TYPE_CHECKING:
    import torch

BLOCK_SIZE = 8 * 1024 * 1024  # one pread / one host-to-device copy; hashlib frees the GIL
SEGMENT_SIZE = 64 * 1024 * 1024  # the unit a thread takes when no chunk digests split the file
MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors format itself sets
_RING = 2  # pinned buffers per reader thread: one being read into while one is copied out

# safetensors dtype code -> (torch dtype name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: ``start``/``end`` are offsets in the data section."""

    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section (8 + header length)
    file_size: int
    raw: bytes  # the file's first ``data_start`` bytes, for the first chunk digest


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors header; any problem is an ``InvalidInput`` naming the file."""
    file = Path(path)
    try:
        with file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(file, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(file, f"header length {n} does not fit in the file's {size} bytes")
            raw = prefix + f.read(n)
    except OSError as exc:
        raise InvalidInput(f"{file}: cannot read: {exc}", path=str(file)) from exc
    try:
        doc = json.loads(raw[8:])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(file, f"header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _bad(file, "header must be a JSON object")
    data_len = size - 8 - n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _bad(file, "__metadata__ must be an object of strings")
    entries = [_entry(file, name, spec, data_len) for name, spec in doc.items()]
    return Header(
        entries=tuple(sorted(entries, key=lambda e: e.start)),
        metadata={str(k): str(v) for k, v in metadata.items()},
        data_start=8 + n,
        file_size=size,
        raw=raw,
    )


def _entry(file: Path, name: str, spec: Any, data_len: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _bad(file, f"tensor {name!r}: expected an object, got {spec!r}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(file, f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(file, f"tensor {name!r}: shape must be a list of sizes, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise _bad(
            file,
            f"tensor {name!r}: data_offsets {offsets!r} out of the data section's "
            f"{data_len} bytes (truncated file?)",
        )
    if offsets[1] - offsets[0] != _numel(shape) * DTYPES[dtype][1]:
        raise _bad(file, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for {dtype}{shape}")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _bad(file: Path, problem: str) -> InvalidInput:
    return InvalidInput(f"{file} is not a valid safetensors file: {problem}", path=str(file))


# -- reading plans ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    """A file range one thread reads in order; ``chunk`` is its digest's index, if hashed."""

    start: int
    end: int
    chunk: int | None

    def blocks(self, block_size: int) -> Iterator[tuple[int, int]]:
        for off in range(self.start, self.end, block_size):
            yield off, min(block_size, self.end - off)


def _segments(header: Header, digest: integrity.FileDigest | None) -> list[_Segment]:
    """The data section cut into segments; with chunk digests, one segment per chunk (its
    part in the header is hashed from ``header.raw``), so each segment hashes in order."""
    if digest is not None:
        return [
            _Segment(min(max(off, header.data_start), off + n), off + n, i)
            for i, (off, n) in enumerate(digest.chunk_ranges())
        ]
    return [
        _Segment(off, min(off + SEGMENT_SIZE, header.file_size), None)
        for off in range(header.data_start, header.file_size, SEGMENT_SIZE)
    ]


def _chunk_hasher(header: Header, digest: integrity.FileDigest, chunk: int) -> Any:
    off, n = digest.chunk_ranges()[chunk]
    h = hashlib.sha256()
    if off < header.data_start:
        h.update(header.raw[off : min(off + n, header.data_start)])
    return h


def _read_segment(
    fd: int,
    file: Path,
    header: Header,
    digest: integrity.FileDigest | None,
    seg: _Segment,
    block_size: int,
    got: dict[int, str],
    into: Callable[[int, int], memoryview],
    then: Callable[[int, int], None] | None = None,
) -> None:
    """Read ``seg`` block by block into ``into(offset, n)``, hashing it when its chunk has a
    digest (recorded in ``got``); ``then(offset, n)`` runs once each block is in."""
    h = _chunk_hasher(header, digest, seg.chunk) if digest and seg.chunk is not None else None
    for off, n in seg.blocks(block_size):
        view = into(off, n)
        _pread_into(fd, view, off, file)
        if h is not None:
            h.update(view)
        if then is not None:
            then(off, n)
    if h is not None and seg.chunk is not None:
        got[seg.chunk] = h.hexdigest()


def _pread_into(fd: int, view: memoryview, offset: int, file: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InvalidInput(f"{file} became shorter while it was read", path=str(file))
        done += got


def _checked_digest(file: Path, header: Header) -> integrity.FileDigest | None:
    """The digest to check while reading, or None when none is expected or it was verified
    already (by ``prefetch``) since the registry's ``expect``."""
    digest = integrity.expected_digest(file)
    if digest is None or not integrity.unverified([file]):
        return None
    integrity.check_size(integrity.label_of(file), header.file_size, digest)
    return digest


# -- the loader ---------------------------------------------------------------------------


def load_safetensors(
    path: str | Path,
    device: str,
    *,
    dtype: torch.dtype | None = None,
    threads: int | None = None,
    block_size: int = BLOCK_SIZE,
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on ``device`` ("cpu" or "cuda:N").

    All tensors are views into one buffer (so freeing one frees nothing until all are gone);
    a tensor whose offset is not aligned for its dtype is copied out. ``dtype`` casts the
    floating-point tensors after loading. When ``integrity.expect`` recorded the file's
    digest, every byte is checked on the way and ``IntegrityError`` raised before anything
    is returned; on success the file is marked verified. The exceptions: a file a prefetch
    checked already, and one inside ``check_after_load``, whose caller checks it once it is
    loaded. Both check the file as it is on disk, not the bytes this read: a writer that
    swaps a blob and restores it in between is not caught (registry blobs are read-only).
    """
    import torch

    file = Path(path).resolve()
    await_prefetch(file)
    header = read_header(file)
    digest = None if _checked_after(file) else _checked_digest(file, header)
    hashed = digest if digest is not None and digest.chunks else None
    segments = _segments(header, hashed)
    n_threads = max(1, min(threads or integrity.default_threads(), len(segments)))
    data_len = header.file_size - header.data_start
    on_cuda = torch.device(device).type == "cuda"
    buffer = torch.empty(data_len, dtype=torch.uint8, device=device)
    got: dict[int, str] = {}
    fd = os.open(file, os.O_RDONLY)
    try:
        if on_cuda and data_len:
            _read_to_cuda(fd, file, header, hashed, segments, buffer, n_threads, block_size, got)
        elif data_len or hashed is not None:  # header-only chunks still need their digests
            _read_to_host(fd, file, header, hashed, segments, buffer, n_threads, block_size, got)
    finally:
        os.close(fd)
    if digest is not None:
        if hashed is not None:
            integrity.check_chunks(integrity.label_of(file), hashed, got)
        else:  # a whole-file digest only: one more (page-cache) pass, in order
            integrity.verify_file(file, digest)
        integrity.claim_verified(file)
    return _views(header, buffer, dtype)


_reserved: list[torch.Tensor] = []  # a pinned staging buffer made ahead (``reserve_staging``)


def reserve_staging(threads: int | None = None, block_size: int = BLOCK_SIZE) -> None:
    """Pin the staging memory the next CUDA load will use, ahead of it: a standby worker
    (``worker.standby``) pays this before its model is known. The next load takes the
    buffer and frees it when done, so a serving process keeps no pinned memory."""
    import torch

    n = (threads or integrity.default_threads()) * _RING * block_size
    _reserved[:] = [torch.empty(n, dtype=torch.uint8, pin_memory=True)]


def _take_staging(nbytes: int) -> torch.Tensor:
    import torch

    if _reserved and _reserved[0].numel() >= nbytes:
        return _reserved.pop()[:nbytes]
    _reserved.clear()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def _read_to_host(
    fd: int,
    file: Path,
    header: Header,
    digest: integrity.FileDigest | None,
    segments: list[_Segment],
    buffer: torch.Tensor,
    n_threads: int,
    block_size: int,
    got: dict[int, str],
) -> None:
    """Read straight into the destination tensor: no staging on CPU."""
    dest = buffer.numpy().data if buffer.device.type == "cpu" else memoryview(b"")

    def into(off: int, n: int) -> memoryview:
        return dest[off - header.data_start : off - header.data_start + n]

    def read(seg: _Segment) -> None:
        _read_segment(fd, file, header, digest, seg, block_size, got, into)

    with ThreadPoolExecutor(n_threads, thread_name_prefix="weights-read") as pool:
        list(pool.map(read, segments))


def _read_to_cuda(
    fd: int,
    file: Path,
    header: Header,
    digest: integrity.FileDigest | None,
    segments: list[_Segment],
    buffer: torch.Tensor,
    n_threads: int,
    block_size: int,
    got: dict[int, str],
) -> None:
    """Each thread takes segments in turn and cycles through its own ``_RING`` pinned buffers:
    it reads (and hashes) block k+1 while the copy of block k runs on its stream; an event
    per buffer says when the buffer is free again."""
    import torch

    # One pinned allocation for all threads: pinning costs time per call as well as per byte.
    staging = _take_staging(n_threads * _RING * block_size)
    host = staging.numpy().data
    todo = iter(segments)
    lock = threading.Lock()
    failed = threading.Event()

    def next_segment() -> _Segment | None:
        with lock:
            return None if failed.is_set() else next(todo, None)

    def worker(t: int) -> None:
        torch.cuda.set_device(buffer.device)  # the current device is per thread
        stream = torch.cuda.Stream(device=buffer.device)  # type: ignore[no-untyped-call]
        events: list[Any] = [None] * _RING
        k = 0

        def into(off: int, n: int) -> memoryview:
            """The next pinned buffer of this thread's ring, once its last copy is done."""
            slot = k % _RING
            if events[slot] is not None:
                events[slot].synchronize()
            base = (t * _RING + slot) * block_size
            return host[base : base + n]

        def then(off: int, n: int) -> None:
            """Copy the block just read to the device, on this thread's stream."""
            nonlocal k
            slot = k % _RING
            k += 1
            base, dst = (t * _RING + slot) * block_size, off - header.data_start
            with torch.cuda.stream(stream):
                buffer[dst : dst + n].copy_(staging[base : base + n], non_blocking=True)
                events[slot] = torch.cuda.Event()  # type: ignore[no-untyped-call]
                events[slot].record(stream)

        try:
            while (seg := next_segment()) is not None:
                _read_segment(fd, file, header, digest, seg, block_size, got, into, then)
        except BaseException:
            failed.set()
            raise
        finally:
            # Copies still in flight read the staging memory and write the device buffer:
            # both must outlive them, on success and on error alike.
            stream.synchronize()

    with ThreadPoolExecutor(n_threads, thread_name_prefix="weights-read") as pool:
        for future in [pool.submit(worker, t) for t in range(n_threads)]:
            future.result()


def _views(
    header: Header, buffer: torch.Tensor, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    for e in header.entries:
        torch_dtype = getattr(torch, DTYPES[e.dtype][0])
        raw = buffer[e.start : e.end]
        if e.start % DTYPES[e.dtype][1]:
            raw = raw.clone()  # a fresh allocation is aligned; a view at this offset would not be
        tensor = raw.view(torch_dtype).view(e.shape)
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        out[e.name] = tensor
    return out


# -- prefetch -----------------------------------------------------------------------------


class Prefetch:
    """A file being read into the page cache (and verified, when a digest is expected) by
    background threads. Start it before ``import torch``: the reads overlap the import."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self._error: IntegrityError | None = None
        self._thread = threading.Thread(
            target=self._run, args=(threads,), name="weights-prefetch", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until the file is read; raise ``IntegrityError`` if it did not match."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self, threads: int) -> None:
        try:
            self._read(threads)
        except IntegrityError as exc:
            self._error = exc
        except (OSError, InvalidInput):
            pass  # the loader reads the file again and reports what is wrong with it

    def _read(self, threads: int) -> None:
        digest = integrity.expected_digest(self.path)
        unchecked = integrity.unverified([self.path])
        if digest is not None and (digest.blake3 or digest.chunks) and unchecked:
            # Checking fills the page cache as well, on all cores: 1 GB on the H100 machine in
            # 0.02 s (BLAKE3) or 0.10 s (SHA-256 chunks), where reading into fresh 32 MiB
            # buffers (zeroed under the GIL) took 0.36 s and slowed the import it overlaps.
            integrity.verify_file(self.path, digest, name=integrity.label_of(self.path))
            integrity.claim_verified(self.path)
            return
        header = read_header(self.path)  # nothing to check here: fill the page cache
        fd = os.open(self.path, os.O_RDONLY)

        def read(seg: _Segment) -> None:
            scratch = memoryview(bytearray(min(BLOCK_SIZE, seg.end - seg.start)))
            into = lambda _, n: scratch[:n]  # noqa: E731
            _read_segment(fd, self.path, header, None, seg, BLOCK_SIZE, {}, into)

        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="weights-prefetch") as pool:
                list(pool.map(read, _segments(header, None)))
        finally:
            os.close(fd)


_prefetch_lock = threading.Lock()
_prefetches: dict[Path, Prefetch] = {}


def prefetch(path: str | Path, *, threads: int | None = None) -> Prefetch:
    """Start reading ``path`` in the background; ``load_safetensors`` of the same file waits
    for it and then skips the hashing it already did. Call ``integrity.expect`` first."""
    file = Path(path).resolve()
    with _prefetch_lock:
        running = _prefetches.get(file)
        if running is None:
            running = _prefetches[file] = Prefetch(file, threads or integrity.default_threads())
    return running


_after_load: set[Path] = set()


@contextmanager
def check_after_load(paths: Iterable[Path]) -> Iterator[None]:
    """Within it, ``load_safetensors`` reads ``paths`` without hashing them: the caller checks
    them once they are loaded (``integrity.check_in_background``: the reads come from the
    page cache the load just filled), and lets nothing computed from them out before that.
    Reading at full speed, then hashing on all cores while the model warms up on the
    weights, beats hashing inside the reader threads (1 GB on the H100 machine: 0.05 s to
    read, against 0.11 s to read and hash)."""
    files = {Path(p).resolve() for p in paths}
    with _prefetch_lock:
        _after_load.update(files)
    try:
        yield
    finally:
        with _prefetch_lock:
            _after_load.difference_update(files)


def _checked_after(file: Path) -> bool:
    with _prefetch_lock:
        return file in _after_load


def await_prefetch(file: Path) -> None:
    """Wait for a prefetch of ``file`` (a resolved path), if one runs; raise its
    ``IntegrityError``. Does nothing when none was started."""
    with _prefetch_lock:
        running = _prefetches.pop(file, None)
    if running is not None:
        running.wait()


# -- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * DTYPES[self.dtype][1]


def write_safetensors(
    path: str | Path,
    specs: Sequence[TensorSpec],
    tensors: Iterable[torch.Tensor],
    *,
    metadata: dict[str, str] | None = None,
    on_written: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file one tensor at a time, ``tensors`` in the order of ``specs``:
    from a generator, a file larger than memory can be written. ``on_written`` gets each
    tensor's byte count (for a progress bar). The file appears complete or not at all."""
    import torch

    doc: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in specs:
        if spec.dtype not in DTYPES:
            raise InvalidInput(f"tensor {spec.name!r}: unknown dtype {spec.dtype!r}")
        doc[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for spec, made in zip(specs, tensors, strict=True):
            tensor = made.detach().to("cpu").contiguous()
            want = getattr(torch, DTYPES[spec.dtype][0])
            if tensor.dtype != want or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"tensor {spec.name!r} is {tensor.dtype}{list(tensor.shape)}, "
                    f"expected {want}{list(spec.shape)}"
                )
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if on_written is not None:
                on_written(spec.nbytes)
        f.flush()
        os.fsync(f.fileno())  # clean pages: a benchmark can then evict them from the cache
    partial.replace(target)
