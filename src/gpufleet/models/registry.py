"""The local model registry: immutable, content-addressed versions in an OCI image layout.

Layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md), so ORAS,
skopeo and registries read it as is::

    registry/oci-layout
    registry/index.json              one entry per version and per tag
    registry/blobs/sha256/<hex>      every file once, by digest, across all versions
    registry/checkouts/<hex>/        a version's files as symlinks to its blobs, for loaders

A version is an OCI image manifest: the config blob is the validated ``model.yaml`` as JSON,
each file is a layer titled with its path and carrying its BLAKE3 and chunk digests (see
``integrity``). The manifest is serialised deterministically, so the same files under the
same ``model.yaml`` give the same artifact digest and re-packaging is a no-op (a version an
older gpufleet packaged, with fewer digests recorded, is recognised by its files), while
different content under an existing version is refused. Tags (``stable``, ``canary``) are
index entries that move; versions and digests never do.

Writers serialise on an ``flock`` of ``registry/.lock``; blobs appear atomically (temp file,
then rename under their digest), so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpufleet.errors import Conflict, IntegrityError, InvalidInput, NotFound
from gpufleet.models.integrity import CHUNK_SIZE, FileDigest, hash_file, verify_file
from gpufleet.models.manifest import MODEL_FILE, NAME_PATTERN, ModelManifest

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ARTIFACT_TYPE = "application/vnd.gpufleet.model.v1"
CONFIG_TYPE = "application/vnd.gpufleet.model.config.v1+json"
FILE_TYPE = "application/vnd.gpufleet.model.file.v1"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
A_NAME = "io.gpufleet.model.name"
A_VERSION = "io.gpufleet.model.version"
A_TAG = "io.gpufleet.tag"
A_CREATED = "org.opencontainers.image.created"
A_CHUNK_SIZE = "io.gpufleet.chunk-size"
A_CHUNKS = "io.gpufleet.chunks"
A_BLAKE3 = "io.gpufleet.blake3"
_TAG = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_SKIP_DIRS = {"__pycache__", ".git", ".ipynb_checkpoints"}

Progress = Callable[[str, int, int], None]  # (what, done_bytes, total_bytes)


@dataclass(frozen=True)
class FileRecord:
    path: str
    digest: FileDigest

    @property
    def blob(self) -> str:
        return f"sha256:{self.digest.sha256}"


@dataclass(frozen=True)
class Artifact:
    """One version in the registry."""

    name: str
    version: str
    digest: str  # "sha256:<hex>" of the manifest: the artifact's identity
    size: int  # manifest + config + every file
    created: str
    tags: tuple[str, ...] = ()
    files: tuple[FileRecord, ...] = field(default=(), compare=False)
    manifest: ModelManifest | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "size": self.size,
            "created": self.created,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class Checkout:
    """A version's files on disk (symlinks to blobs) and the digests a loader must match."""

    artifact: Artifact
    path: Path
    files: dict[Path, FileDigest]


def split_ref(ref: str) -> tuple[str, str | None]:
    """``NAME[@VERSION|@TAG|@sha256:HEX]`` (``NAME:TAG`` too) -> (name, selector or None)."""
    name, sep, selector = ref.partition("@")
    if not sep and ":" in ref:
        name, _, selector = ref.partition(":")
    if not re.match(NAME_PATTERN, name) or (sep and not selector):
        raise InvalidInput(
            f"{ref!r} is not a model reference: write NAME, NAME@VERSION, NAME@TAG or "
            "NAME@sha256:DIGEST",
            ref=ref,
        )
    return name, selector or None


def looks_like_ref(spec: str) -> bool:
    """A ``serve --model`` argument that names a registry model rather than a directory."""
    if spec.startswith(("builtin:", "/", ".", "~")) or os.sep in spec.split("@")[0]:
        return False
    try:
        split_ref(spec)
    except InvalidInput:
        return False
    return not Path(spec).is_dir()


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"

    # -- reading ---------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[Artifact]:
        """Every version (of ``name``), oldest first, with the tags that point at it."""
        entries = self._index()["manifests"]
        tags: dict[tuple[str, str], list[str]] = {}
        for e in entries:
            ann = e.get("annotations", {})
            if A_TAG in ann:
                tags.setdefault((ann[A_NAME], e["digest"]), []).append(ann[A_TAG])
        out = []
        for e in entries:
            ann = e.get("annotations", {})
            if A_TAG in ann or A_NAME not in ann or (name and ann[A_NAME] != name):
                continue
            out.append(
                Artifact(
                    name=ann[A_NAME],
                    version=ann[A_VERSION],
                    digest=e["digest"],
                    size=int(ann.get("io.gpufleet.size", e["size"])),
                    created=ann.get(A_CREATED, ""),
                    tags=tuple(sorted(tags.get((ann[A_NAME], e["digest"]), []))),
                )
            )
        return sorted(out, key=lambda a: (a.name, a.created, a.version))

    def resolve(self, ref: str) -> Artifact:
        """The version ``ref`` names, with its files and manifest. A bare NAME means its
        ``stable`` tag when there is one, else its newest version."""
        name, selector = split_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = sorted({a.name for a in self.versions()})
            raise NotFound(
                f"no model {name!r} in the registry at {self.root}"
                + (f"; it holds: {', '.join(known)}" if known else "; it is empty")
                + " (package one with `gpufleet models package DIR`)",
                ref=ref,
            )
        found: Artifact | None
        if selector is None:
            found = next((a for a in versions if "stable" in a.tags), versions[-1])
        elif selector.startswith("sha256:"):
            matches = [a for a in versions if a.digest.startswith(selector)]
            if len(matches) > 1:
                raise InvalidInput(f"{ref!r} matches several versions; give more digits", ref=ref)
            found = matches[0] if matches else None
        else:
            found = next((a for a in versions if selector in a.tags), None) or next(
                (a for a in versions if a.version == selector), None
            )
        if found is None:
            listed = ", ".join(a.version for a in versions)
            raise NotFound(f"{ref!r} not found; {name} has versions {listed}", ref=ref)
        return self._with_manifest(found)

    def _with_manifest(self, artifact: Artifact) -> Artifact:
        manifest, files = self._stored(artifact.digest, artifact.ref)
        config = json.loads(self._read_verified(manifest["config"]["digest"], "model.yaml"))
        return Artifact(
            **{**artifact.__dict__, "files": files, "manifest": ModelManifest.from_data(config)}
        )

    def _stored(self, digest: str, label: str) -> tuple[dict[str, Any], tuple[FileRecord, ...]]:
        """The stored manifest ``digest`` (checked against it) and its files."""
        manifest = json.loads(self._read_verified(digest, f"manifest of {label}"))
        return manifest, tuple(_file_record(layer) for layer in manifest["layers"])

    def manifest_bytes(self, digest: str) -> bytes:
        return self._read_verified(digest, digest)

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise InvalidInput(f"{digest!r} is not a sha256 digest")
        return self.blobs / hexdigest

    def _read_verified(self, digest: str, label: str) -> bytes:
        path = self.blob_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"{label}: blob {digest} is missing from {self.blobs}", digest=digest
            ) from None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"{label}: blob {digest} does not match its digest: the registry is corrupted "
                "or was tampered with; refusing to use it",
                digest=digest,
            )
        return data

    def verify(self, ref: str) -> Artifact:
        """Check every file of a version against its digests (all cores)."""
        artifact = self.resolve(ref)
        self.verify_files(artifact.files, artifact.ref)
        return artifact

    def verify_manifest(self, digest: str, label: str) -> None:
        """Check the files of a stored manifest no version names yet (a pull, before it
        records one): a manifest whose digests its blobs do not match is never listed."""
        manifest, files = self._stored(digest, label)
        self._read_verified(manifest["config"]["digest"], f"{label}:{MODEL_FILE}")
        self.verify_files(files, label)

    def verify_files(self, files: Iterable[FileRecord], label: str) -> None:
        """Every digest of every file (``verify_file(every=True)``): its BLAKE3 and chunks."""
        for rec in files:
            name = f"{label}:{rec.path}"
            verify_file(self.blob_path(rec.blob), rec.digest, name=name, every=True)

    def checkout(self, ref: str) -> Checkout:
        """A directory with the version's files (symlinks into the blobs), for a loader.

        Nothing is verified here: the caller verifies (``models.loader``), so a 10 GB
        weights file is read once, by the loader that checks it on the way.
        """
        artifact = self.resolve(ref)
        hexdigest = artifact.digest.removeprefix("sha256:")
        target = self.root / "checkouts" / hexdigest
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            for rec in artifact.files:
                link = tmp / rec.path
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(self.blob_path(rec.blob))
            try:
                tmp.rename(target)
            except OSError:  # another process checked it out first: same content
                shutil.rmtree(tmp, ignore_errors=True)
        files = {target / rec.path: rec.digest for rec in artifact.files}
        return Checkout(artifact, target, files)

    # -- writing ---------------------------------------------------------------------------

    def package(
        self,
        model_dir: str | Path,
        *,
        tags: tuple[str, ...] = (),
        keep: int | None = None,
        progress: Progress | None = None,
    ) -> Artifact:
        """Store ``model_dir`` as an immutable version; tag it; keep the last ``keep``."""
        source = Path(model_dir)
        manifest = ModelManifest.from_yaml(source)
        spec = manifest.model
        for tag in tags:
            self._check_tag(tag)
        paths = _package_files(source, [f.path for f in spec.files])
        total = sum((source / p).stat().st_size for p in paths)
        self.blobs.mkdir(parents=True, exist_ok=True)
        records = []
        done = 0
        for rel in paths:
            records.append(FileRecord(rel, self._store_file(source / rel)))
            done += records[-1].digest.size
            if progress:
                progress(rel, done, total)
        config = _canonical(manifest.to_data())
        config_digest = self._store_bytes(config)
        body = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(config)},
            "layers": [_layer(rec) for rec in records],
            "annotations": {
                A_NAME: spec.name,
                A_VERSION: spec.version,
                "org.opencontainers.image.title": spec.name,
                "org.opencontainers.image.version": spec.version,
            },
        }
        raw = _canonical(body)
        existing = self._same_files(spec.name, spec.version, config_digest, records)
        if existing is not None:  # packaged before, with fewer digests recorded: the same content
            digest = existing
        else:
            digest = self._store_bytes(raw)
            size = len(raw) + len(config) + sum(r.digest.size for r in records)
            self.add(spec.name, spec.version, digest, len(raw), size=size)
        for tag in tags:
            self.tag(f"{spec.name}@{digest}", tag)
        if keep is not None:
            self.prune(spec.name, keep=keep)
        return self.resolve(f"{spec.name}@{digest}")

    def _same_files(
        self, name: str, version: str, config_digest: str, records: list[FileRecord]
    ) -> str | None:
        """The manifest digest of ``name@version`` when it holds the same model.yaml and the
        same files (paths and SHA-256) as ``records``: re-packaging it is a no-op even where
        an older gpufleet wrote that manifest (without BLAKE3 annotations, so other bytes).
        None otherwise: a new version, or other content, which ``add`` refuses."""
        for a in self.versions(name):
            if a.version != version:
                continue
            manifest, files = self._stored(a.digest, a.ref)
            same = manifest["config"]["digest"] == config_digest and sorted(
                (f.path, f.blob) for f in files
            ) == sorted((r.path, r.blob) for r in records)
            return a.digest if same else None
        return None

    def add(self, name: str, version: str, digest: str, manifest_size: int, *, size: int) -> None:
        """Record a stored manifest as version ``name@version`` (package and pull end here)."""
        with self._locked() as index:
            for e in index["manifests"]:
                ann = e.get("annotations", {})
                if ann.get(A_NAME) == name and ann.get(A_VERSION) == version and A_TAG not in ann:
                    if e["digest"] == digest:
                        return  # the same content again: nothing to do
                    raise Conflict(
                        f"{name}@{version} already exists with other content ({e['digest']}); "
                        "versions are immutable: give the new content a new version",
                        existing=e["digest"],
                        new=digest,
                    )
            entry = _entry(digest, manifest_size, name, f"{name}:{version}", version=version)
            entry["annotations"]["io.gpufleet.size"] = str(size)
            index["manifests"].append(entry)

    def tag(self, ref: str, tag: str) -> Artifact:
        """Point ``name:tag`` at the version ``ref`` names (moving it if it pointed elsewhere)."""
        self._check_tag(tag)
        artifact = self.resolve(ref)
        if any(a.version == tag for a in self.versions(artifact.name)):
            raise InvalidInput(f"{tag!r} is a version of {artifact.name}; a tag must differ")
        with self._locked() as index:
            index["manifests"] = [
                e
                for e in index["manifests"]
                if not (
                    e.get("annotations", {}).get(A_NAME) == artifact.name
                    and e.get("annotations", {}).get(A_TAG) == tag
                )
            ]
            entry = _entry(artifact.digest, 0, artifact.name, f"{artifact.name}:{tag}", tag=tag)
            entry["size"] = len(self.manifest_bytes(artifact.digest))
            index["manifests"].append(entry)
        return self.resolve(f"{artifact.name}@{artifact.digest}")

    def untag(self, name: str, tag: str) -> None:
        with self._locked() as index:
            before = len(index["manifests"])
            index["manifests"] = [
                e
                for e in index["manifests"]
                if not (
                    e.get("annotations", {}).get(A_NAME) == name
                    and e.get("annotations", {}).get(A_TAG) == tag
                )
            ]
            if len(index["manifests"]) == before:
                raise NotFound(f"{name} has no tag {tag!r}")

    def remove(self, ref: str, *, force: bool = False) -> Artifact:
        """Forget a version (its blobs go at the next ``gc``). A tagged version needs ``force``."""
        artifact = self.resolve(ref)
        if artifact.tags and not force:
            raise Conflict(
                f"{artifact.ref} is tagged {', '.join(artifact.tags)}; move the tags or "
                "remove it with --force",
                tags=list(artifact.tags),
            )
        with self._locked() as index:
            index["manifests"] = [
                e
                for e in index["manifests"]
                if not (
                    e["digest"] == artifact.digest
                    and e.get("annotations", {}).get(A_NAME) == artifact.name
                )
            ]
        shutil.rmtree(
            self.root / "checkouts" / artifact.digest.removeprefix("sha256:"), ignore_errors=True
        )
        return artifact

    def prune(self, name: str, *, keep: int) -> list[Artifact]:
        """Remove all but the newest ``keep`` versions of ``name``; tagged ones always stay."""
        if keep < 1:
            raise InvalidInput(f"keep must be at least 1, got {keep}")
        versions = self.versions(name)
        doomed = [a for a in versions[: max(0, len(versions) - keep)] if not a.tags]
        return [self.remove(f"{a.name}@{a.digest}") for a in doomed]

    def gc(self, *, dry_run: bool = False) -> tuple[list[str], int]:
        """Delete blobs no version references (and stale checkouts): (digests, bytes freed)."""
        with self._locked() as index:
            live: set[str] = set()
            for e in index["manifests"]:
                live.add(e["digest"])
                manifest = json.loads(self.manifest_bytes(e["digest"]))
                live.add(manifest["config"]["digest"])
                live.update(layer["digest"] for layer in manifest["layers"])
            doomed: list[str] = []
            freed = 0
            cutoff = time.time() - 3600  # a temp file of a package still running elsewhere
            for path in self.blobs.iterdir() if self.blobs.is_dir() else []:
                if path.name.startswith(".tmp-"):
                    if path.stat().st_mtime < cutoff and not dry_run:
                        path.unlink(missing_ok=True)
                    continue
                if f"sha256:{path.name}" not in live:
                    doomed.append(f"sha256:{path.name}")
                    freed += path.stat().st_size
                    if not dry_run:
                        path.unlink()
            checkouts = self.root / "checkouts"
            for path in checkouts.iterdir() if checkouts.is_dir() else []:
                if f"sha256:{path.name}" not in live and not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
        return doomed, freed

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` as a blob (pull writes manifests through this); returns its digest."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        return self._store_bytes(data)

    # -- internals -------------------------------------------------------------------------

    def _store_file(self, source: Path) -> FileDigest:
        """Copy ``source`` into a temp blob, hash the copy (what is stored is what is hashed),
        then rename it to its digest; an identical blob already there is kept."""
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=self.blobs)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            digest = hash_file(tmp, chunk_size=CHUNK_SIZE)
            final = self.blobs / digest.sha256
            if final.exists() and final.stat().st_size == digest.size:
                tmp.unlink()
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
            return digest
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _store_bytes(self, data: bytes) -> str:
        hexdigest = hashlib.sha256(data).hexdigest()
        final = self.blobs / hexdigest
        if not final.exists():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.blobs)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        return f"sha256:{hexdigest}"

    def _index(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{self.root / 'index.json'} is not valid JSON: {exc}") from exc
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The index, under the registry's lock; written back atomically on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        layout = self.root / "oci-layout"
        if not layout.exists():
            layout.write_text('{"imageLayoutVersion": "1.0.0"}\n')
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._index()
            yield index
            fd, tmp = tempfile.mkstemp(prefix=".index-", dir=self.root)
            with os.fdopen(fd, "w") as out:
                json.dump(index, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.root / "index.json")

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not _TAG.match(tag) or tag.startswith("sha256"):
            raise InvalidInput(
                f"{tag!r} is not a tag: letters, digits, '_', '.', '-', up to 64, "
                "starting with a letter or '_'",
                tag=tag,
            )


def _package_files(source: Path, listed: list[str]) -> list[str]:
    """The files a version holds: ``model.yaml`` plus the listed files, or every regular file
    of the directory (hidden files and caches left out) when none are listed.

    A symlink is stored as the file it points at, under the link's path, when it stays inside
    the directory; one that leaves it (``link.txt -> /etc/passwd``), points at nothing, or
    loops back to a directory holding it is refused, every one named, before anything is
    stored."""
    root = source.resolve()
    bad: list[str] = []
    if listed:
        for rel in sorted({MODEL_FILE, *listed}):
            bad += _link_problems(source, root, rel)
        if bad:
            raise _links_refused(source, bad)
        missing = [p for p in listed if not (source / p).is_file()]
        if missing:
            raise InvalidInput(
                f"{source / MODEL_FILE}: model.files lists {', '.join(missing)}, "
                f"which {'is' if len(missing) == 1 else 'are'} not in {source}",
                field="model.files",
            )
        return sorted({MODEL_FILE, *listed})
    found = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        here = Path(dirpath)
        kept = []
        for d in sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")):
            problems = _link_problems(source, root, (here / d).relative_to(source).as_posix())
            bad += problems
            if not problems:
                kept.append(d)
        dirnames[:] = kept
        for fname in filenames:
            if fname.startswith(".") or fname.endswith(".pyc"):
                continue
            path = here / fname
            problems = _link_problems(source, root, path.relative_to(source).as_posix())
            bad += problems
            if not problems and path.is_file():
                found.append(path.relative_to(source).as_posix())
    if bad:
        raise _links_refused(source, bad)
    return sorted(found)


def _link_problems(source: Path, root: Path, rel: str) -> list[str]:
    """``rel -> target (why)`` when ``rel`` (or a directory on its way) is a symlink that
    leaves ``root``, dangles or loops; [] for a plain path or a link that stays inside."""
    path = source / rel
    if not path.is_symlink():
        if path.exists() and not path.resolve().is_relative_to(root):  # via a linked parent
            return [f"{rel} -> {path.resolve()} (outside {root})"]
        return []
    target = os.readlink(path)
    real = Path(os.path.realpath(path))
    if not real.exists():
        return [f"{rel} -> {target} (points at nothing)"]
    if not real.is_relative_to(root):
        return [f"{rel} -> {target} (outside {root})"]
    if real.is_dir() and path.parent.resolve().is_relative_to(real):
        return [f"{rel} -> {target} (a loop: it points at a directory that holds it)"]
    return []


def _links_refused(source: Path, problems: list[str]) -> InvalidInput:
    return InvalidInput(
        f"{source}: refused to package symlinks that do not stay inside the model directory: "
        + "; ".join(problems)
        + ". Copy the files into the directory (or remove the links) and package again",
        path=str(source),
        problems=problems,
    )


def _layer(rec: FileRecord) -> dict[str, Any]:
    return {
        "mediaType": FILE_TYPE,
        "digest": rec.blob,
        "size": rec.digest.size,
        "annotations": {
            TITLE: rec.path,
            A_CHUNK_SIZE: str(rec.digest.chunk_size),
            A_CHUNKS: ",".join(rec.digest.chunks),
            **({A_BLAKE3: rec.digest.blake3} if rec.digest.blake3 else {}),
        },
    }


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_record(layer: dict[str, Any]) -> FileRecord:
    """A layer's file; ``IntegrityError`` naming the layer when its annotations (which may
    come from a pulled manifest) are not what ``_layer`` writes."""
    ann = layer.get("annotations") or {}
    where = f"layer {layer.get('digest')!r}"
    path = ann.get(TITLE)
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts:
        raise IntegrityError(f"{where} has no safe file path ({path!r})")
    chunks_text, chunk_size = ann.get(A_CHUNKS, ""), ann.get(A_CHUNK_SIZE, str(CHUNK_SIZE))
    chunks = tuple(c for c in chunks_text.split(",") if c) if isinstance(chunks_text, str) else ()
    b3 = ann.get(A_BLAKE3, "")
    if (
        not isinstance(chunks_text, str)
        or not all(_HEX64.fullmatch(c) for c in chunks)
        or not (isinstance(chunk_size, str) and chunk_size.isdigit() and int(chunk_size) > 0)
        or not (b3 == "" or (isinstance(b3, str) and _HEX64.fullmatch(b3)))
    ):
        raise IntegrityError(
            f"{where} ({path}) has malformed digest annotations ({A_CHUNKS}, {A_CHUNK_SIZE}, "
            f"{A_BLAKE3}): the manifest was not written by gpufleet or was damaged"
        )
    digest = FileDigest(
        sha256=str(layer["digest"]).removeprefix("sha256:"),
        size=int(layer["size"]),
        chunk_size=int(chunk_size),
        chunks=chunks,
        blake3=b3,
    )
    return FileRecord(path, digest)


def _entry(
    digest: str,
    size: int,
    name: str,
    ref_name: str,
    *,
    version: str | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    ann = {REF_NAME: ref_name, A_NAME: name}
    if version is not None:
        ann[A_VERSION] = version
        ann[A_CREATED] = datetime.now(UTC).isoformat(timespec="microseconds")
    if tag is not None:
        ann[A_TAG] = tag
    return {
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "digest": digest,
        "size": size,
        "annotations": ann,
    }


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
