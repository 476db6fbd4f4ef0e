"""Blob storage for what is too large for a row: task inputs, results. Content-addressed.

A ref is ``sha256:<hex>``; writing the same bytes twice stores them once. Writes are atomic
(temp file, fsync, rename), so a crash never leaves a half-written blob under a valid ref.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

from gpufleet.errors import InvalidInput, NotFound, StorageFull

_REF = re.compile(r"^sha256:[0-9a-f]{64}$")


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, ref: str) -> bytes: ...
    def delete(self, ref: str) -> None: ...
    def exists(self, ref: str) -> bool: ...


def blob_ref(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class LocalBlobStore:
    """Blobs as files under ``root/sha256/ab/abcdef...``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, ref: str) -> Path:
        if not _REF.match(ref):
            raise InvalidInput(f"not a blob reference: {ref!r} (expected sha256:<64 hex>)")
        digest = ref.split(":", 1)[1]
        return self.root / "sha256" / digest[:2] / digest

    def put(self, data: bytes) -> str:
        ref = blob_ref(data)
        path = self._path(ref)
        if path.exists():
            return ref
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"blob storage at {self.root} is out of space") from e
            raise
        return ref

    def get(self, ref: str) -> bytes:
        try:
            return self._path(ref).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {ref} not found") from None

    def delete(self, ref: str) -> None:
        self._path(ref).unlink(missing_ok=True)

    def exists(self, ref: str) -> bool:
        return self._path(ref).exists()
