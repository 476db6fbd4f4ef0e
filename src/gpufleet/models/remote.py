"""Push and pull model versions between the local OCI image layout and a remote OCI registry.

Speaks the distribution ("registry v2") protocol over httpx: target parsing, Basic and Bearer
auth challenges, chunked blob uploads streamed from disk, downloads verified while they stream.
It writes only ``<layout>/blobs/sha256/*``; ``index.json`` belongs to ``gpufleet.models.registry``,
which records the ``Descriptor`` that ``pull`` returns.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx

from gpufleet import __version__
from gpufleet.errors import (
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageFull,
    Unauthorized,
    Unavailable,
)

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
USERNAME_ENV = "GPUFLEET_REGISTRY_USERNAME"
PASSWORD_ENV = "GPUFLEET_REGISTRY_PASSWORD"  # noqa: S105 - the variable's name, not a password
DEFAULT_CHUNK_SIZE = 64 * 1024 * 1024

Progress = Callable[[int, int], None]

_READ_SIZE = 1024 * 1024
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what the OCI distribution spec asks registries to take
_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=30.0)
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_ANY_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_HOST = re.compile(
    r"(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*)(?::[0-9]{1,5})?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"\w[\w.-]{0,127}", re.ASCII)
_REPO_IN_URL = re.compile(r"^/v2/(.+)/(?:blobs|manifests|tags)/")
_CHALLENGE_PARAM = re.compile(r'([A-Za-z]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Descriptor:
    """An OCI descriptor of a manifest, as an ``index.json`` entry needs it."""

    digest: str  # "sha256:<hex>"
    size: int
    media_type: str
    artifact_type: str | None


def parse_target(target: str) -> tuple[str, str, str]:
    """Split ``host[:port]/repo/path:tag`` or ``...@sha256:<hex>`` into (registry, repository,
    tag-or-digest). With both a tag and a digest, the digest wins (as with docker)."""

    def bad(why: str) -> NoReturn:
        raise InvalidInput(
            f"registry target {target!r} {why}; expected 'host[:port]/repository:tag' or "
            "'host[:port]/repository@sha256:<hex>'",
            field="target",
        )

    registry, slash, rest = target.partition("/")
    if not slash or not rest:
        bad("has no repository")
    if not _HOST.fullmatch(registry) or not (
        "." in registry or ":" in registry or registry == "localhost"
    ):
        bad(f"does not start with a registry host (got {registry!r})")
    name, at, digest = rest.partition("@")
    last_slash = name.rfind("/")
    colon = name.find(":", last_slash + 1)
    repository, tag = (name[:colon], name[colon + 1 :]) if colon >= 0 else (name, "")
    if not repository or not all(_PATH_COMPONENT.fullmatch(p) for p in repository.split("/")):
        bad(f"has an invalid repository name {repository!r} (lowercase a-z, 0-9, '._-' and '/')")
    if len(registry) + 1 + len(repository) > 255:
        bad("has a name longer than 255 characters")
    if colon >= 0 and not _TAG.fullmatch(tag):
        bad(f"has an invalid tag {tag!r} (letters, digits, '_.-', at most 128, not first '.-')")
    if at:
        if not _ANY_DIGEST.fullmatch(digest):
            bad(f"has a malformed digest {digest!r}")
        if not _DIGEST.fullmatch(digest):
            bad(f"uses digest {digest!r}: only lowercase sha256 digests are supported")
        return registry, repository, digest
    if not tag:
        bad("has neither a tag nor a digest")
    return registry, repository, tag


def push(
    layout: Path,
    manifest_digest: str,
    target: str,
    *,
    insecure: bool | None = None,
    progress: Progress | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Descriptor:
    """Upload the manifest ``manifest_digest`` of ``layout`` and its blobs to ``target``.

    Blobs the registry already has (HEAD) are skipped; the others are streamed from disk in
    ``chunk_size`` PATCHes. The manifest is PUT byte for byte, so its digest stays the same.
    ``progress(done, total)`` counts the bytes of the blobs that need uploading.
    """
    registry, repository, reference = parse_target(target)
    if chunk_size < 1:
        raise InvalidInput(f"chunk_size must be positive, got {chunk_size}", field="chunk_size")
    if reference.startswith("sha256:") and reference != manifest_digest:
        raise InvalidInput(
            f"target {target!r} names digest {reference} but the manifest is {manifest_digest}",
            field="target",
        )
    blob_dir = Path(layout) / "blobs" / "sha256"
    raw = _read_local_manifest(blob_dir, manifest_digest)
    manifest = _parse_manifest(raw, manifest_digest)
    blobs = _referenced_blobs(manifest, manifest_digest)
    for digest, size in blobs.items():
        path = blob_dir / digest.removeprefix("sha256:")
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(
                f"blob {digest} of manifest {manifest_digest} is missing from {blob_dir}"
            ) from None
        if actual != size:
            raise IntegrityError(f"{path} is {actual} bytes, its descriptor says {size}")

    with _Session(registry, repository, insecure) as session:
        missing = {d: s for d, s in blobs.items() if not session.blob_exists(d)}
        meter = _Meter(sum(missing.values()), progress)
        for digest, size in missing.items():
            path = blob_dir / digest.removeprefix("sha256:")
            session.upload_blob(path, digest, size, chunk_size, meter)
        session.put_manifest(reference, raw, manifest_digest)
    return _descriptor(manifest, manifest_digest, len(raw))


def pull(
    target: str,
    layout: Path,
    *,
    insecure: bool | None = None,
    progress: Progress | None = None,
) -> Descriptor:
    """Download the manifest at ``target`` and the blobs ``layout`` lacks into ``layout``.

    Every blob is hashed while it streams into a temporary file next to its final place and is
    renamed into place only when digest and size match. Verified blobs stay even if a later one
    fails (a retry resumes); the manifest blob is written last, so its presence means complete.
    ``index.json`` is not touched.
    """
    registry, repository, reference = parse_target(target)
    blob_dir = Path(layout) / "blobs" / "sha256"
    with _Session(registry, repository, insecure) as session:
        raw = session.get_manifest(reference)
        manifest_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if reference.startswith("sha256:") and reference != manifest_digest:
            raise IntegrityError(
                f"{target}: the registry served a manifest with digest {manifest_digest}"
            )
        manifest = _parse_manifest(raw, manifest_digest)
        blobs = _referenced_blobs(manifest, manifest_digest)
        try:
            blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _raise_os_error(exc, blob_dir)
        missing = {d: s for d, s in blobs.items() if not _present(blob_dir, d, s)}
        meter = _Meter(sum(missing.values()), progress)
        for digest, size in missing.items():
            url = f"{session.base}/blobs/{digest}"
            with session.stream(url, what=f"blob {digest}") as response:
                _write_verified(blob_dir, digest, size, response.iter_bytes(_READ_SIZE), meter)
    # Written last, and only once the blobs' directory entries are durable: a manifest in the
    # layout promises that everything it references is there.
    _fsync_dir(blob_dir)
    _write_verified(blob_dir, manifest_digest, len(raw), iter([raw]), None)
    return _descriptor(manifest, manifest_digest, len(raw))


# --- the layout side ------------------------------------------------------------------------


def _read_local_manifest(blob_dir: Path, digest: str) -> bytes:
    if not _DIGEST.fullmatch(digest):
        raise InvalidInput(f"manifest digest must be 'sha256:<64 hex>', got {digest!r}")
    path = blob_dir / digest.removeprefix("sha256:")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"manifest {digest} not found in {blob_dir}") from None
    if "sha256:" + hashlib.sha256(raw).hexdigest() != digest:
        raise IntegrityError(f"{path} does not match its digest {digest}")
    return raw


def _parse_manifest(raw: bytes, digest: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"manifest {digest} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("mediaType") != MANIFEST_MEDIA_TYPE:
        kind = manifest.get("mediaType") if isinstance(manifest, dict) else None
        raise InvalidInput(
            f"manifest {digest} has mediaType {kind!r}; only single OCI image manifests "
            f"({MANIFEST_MEDIA_TYPE}) can be pushed or pulled"
        )
    return manifest


def _referenced_blobs(manifest: dict[str, Any], digest: str) -> dict[str, int]:
    """Config and layer digests with their sizes, each once, config first. Digests come from
    the network, so they are checked before they become file names."""
    descriptors = [manifest.get("config"), *(manifest.get("layers") or [])]
    blobs: dict[str, int] = {}
    for d in descriptors:
        if not (
            isinstance(d, dict)
            and isinstance(d.get("digest"), str)
            and _DIGEST.fullmatch(d["digest"])
            and type(d.get("size")) is int
            and d["size"] >= 0
        ):
            raise InvalidInput(
                f"manifest {digest} has a descriptor without a sha256 digest and size: {d!r}"
            )
        if blobs.setdefault(d["digest"], d["size"]) != d["size"]:
            raise InvalidInput(f"manifest {digest} gives blob {d['digest']} two sizes")
    return blobs


def _descriptor(manifest: dict[str, Any], digest: str, size: int) -> Descriptor:
    artifact_type = manifest.get("artifactType")
    return Descriptor(
        digest=digest,
        size=size,
        media_type=MANIFEST_MEDIA_TYPE,
        artifact_type=artifact_type if isinstance(artifact_type, str) else None,
    )


def _present(blob_dir: Path, digest: str, size: int) -> bool:
    # Blobs land here only through a verified rename, so a file of the right size is trusted;
    # one of the wrong size is corrupt and gets replaced.
    try:
        return (blob_dir / digest.removeprefix("sha256:")).stat().st_size == size
    except FileNotFoundError:
        return False


def _write_verified(
    blob_dir: Path, digest: str, size: int, pieces: Iterator[bytes], meter: _Meter | None
) -> None:
    final = blob_dir / digest.removeprefix("sha256:")
    hasher = hashlib.sha256()
    written = 0
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=blob_dir, prefix=".pull-", suffix=".partial")
        with os.fdopen(fd, "wb") as f:
            for piece in pieces:
                written += len(piece)
                if written > size:
                    raise IntegrityError(f"blob {digest} is longer than its {size} bytes")
                hasher.update(piece)
                f.write(piece)
                if meter is not None:
                    meter.advance(len(piece))
            f.flush()
            os.fsync(f.fileno())
        actual = "sha256:" + hasher.hexdigest()
        if written != size or actual != digest:
            raise IntegrityError(
                f"blob {digest} came as {written} bytes with digest {actual}; expected {size} "
                "bytes. It was discarded; the registry's copy is corrupt or was tampered with."
            )
        os.replace(tmp, final)
        tmp = None
    except OSError as exc:
        _raise_os_error(exc, blob_dir)
    finally:
        if tmp is not None:
            os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _raise_os_error(exc, path)


def _raise_os_error(exc: OSError, where: Path) -> NoReturn:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StorageFull(f"no space left in {where} while pulling: {exc.strerror}") from None
    raise Unavailable(f"cannot write to {where}: {exc.strerror or exc}") from None


class _Meter:
    """Feeds ``progress(done, total)``; reports (0, total) at once so bars appear early."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.total, self.done, self._callback = total, 0, callback
        self.advance(0)

    def advance(self, n: int) -> None:
        self.done += n
        if self._callback is not None:
            self._callback(self.done, self.total)


class _FileSlice:
    """A PATCH body: ``length`` bytes of ``path`` from ``offset``. A plain iterable rather than
    a generator, so httpx can send it again after an auth challenge (tokens expire during long
    uploads); progress is counted only once the chunk is accepted."""

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self.path, self.offset, self.length = path, offset, length

    def __iter__(self) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                piece = f.read(min(_READ_SIZE, left))
                if not piece:
                    raise IntegrityError(f"{self.path} shrank while it was being uploaded")
                left -= len(piece)
                yield piece


# --- the registry side ----------------------------------------------------------------------


class _Session:
    """One registry and repository: an httpx client, and the mapping of every failure to a
    gpufleet error with a one-line message (no httpx exception escapes)."""

    def __init__(self, registry: str, repository: str, insecure: bool | None) -> None:
        if insecure is None:
            insecure = _is_loopback(registry)
        self.registry, self.where = registry, f"{registry}/{repository}"
        self.base = f"{'http' if insecure else 'https'}://{registry}/v2/{repository}"
        self._client = httpx.Client(
            auth=_RegistryAuth(registry, _credentials()),
            timeout=_TIMEOUT,
            follow_redirects=True,  # blob GETs are often redirected to object storage
            headers={"User-Agent": f"gpufleet/{__version__}"},
        )

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def blob_exists(self, digest: str) -> bool:
        r = self._send("HEAD", f"{self.base}/blobs/{digest}", ok=(200, 404), what=f"blob {digest}")
        return r.status_code == 200

    def upload_blob(self, path: Path, digest: str, size: int, chunk: int, meter: _Meter) -> None:
        what = f"the upload of blob {digest}"
        r = self._send("POST", f"{self.base}/blobs/uploads/", ok=(202,), what=what)
        offset = 0
        while offset < size:
            n = min(chunk, size - offset)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(n),
                "Content-Range": f"{offset}-{offset + n - 1}",
            }
            body = _FileSlice(path, offset, n)
            r = self._send(
                "PATCH", _location(r), ok=(202,), what=what, headers=headers, content=body
            )
            offset += n
            meter.advance(n)
        # The upload URL carries the registry's state in its query; add the digest to it.
        done = httpx.URL(_location(r)).copy_merge_params({"digest": digest})
        self._send("PUT", done, ok=(201,), what=what, headers={"Content-Length": "0"})

    def put_manifest(self, reference: str, raw: bytes, digest: str) -> None:
        r = self._send(
            "PUT",
            f"{self.base}/manifests/{reference}",
            ok=(201,),
            what=f"manifest {digest}",
            headers={"Content-Type": MANIFEST_MEDIA_TYPE},
            content=raw,
        )
        echoed = r.headers.get("Docker-Content-Digest")
        if echoed is not None and echoed != digest:
            raise IntegrityError(f"{self.where} stored manifest {digest} as {echoed}")

    def get_manifest(self, reference: str) -> bytes:
        what = f"manifest {reference!r}"
        # Accepting the index type too lets an index come back and be refused by name.
        accept = f"{MANIFEST_MEDIA_TYPE}, {_INDEX_MEDIA_TYPE}"
        url = f"{self.base}/manifests/{reference}"
        with self.stream(url, what=what, headers={"Accept": accept}) as r:
            raw = bytearray()
            for piece in r.iter_bytes(_READ_SIZE):
                raw += piece
                if len(raw) > _MAX_MANIFEST_BYTES:
                    raise InvalidInput(f"{what} in {self.where} is larger than 4 MiB")
            return bytes(raw)

    @contextmanager
    def stream(self, url: str, *, what: str, **kw: Any) -> Iterator[httpx.Response]:
        """GET ``url`` with the body left unread; network errors while it is read are mapped
        too (the generator sees them at its ``yield``)."""
        try:
            with self._client.stream("GET", url, **kw) as r:
                if r.status_code != 200:
                    self._fail(r, what)
                yield r
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            self._unreachable(exc)

    def _send(
        self, method: str, url: str | httpx.URL, *, ok: tuple[int, ...], what: str, **kw: Any
    ) -> httpx.Response:
        try:
            r = self._client.request(method, url, **kw)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            self._unreachable(exc)
        if r.status_code not in ok:
            self._fail(r, what)
        return r

    def _unreachable(self, exc: Exception) -> NoReturn:
        detail = str(exc) or type(exc).__name__
        plain_http = "WRONG_VERSION_NUMBER" in detail  # a TLS hello answered in plain http
        hint = " (it speaks plain http: pass insecure=True)" if plain_http else ""
        raise Unavailable(f"cannot reach registry {self.registry}: {detail}{hint}") from None

    def _fail(self, r: httpx.Response, what: str) -> NoReturn:
        try:
            errors = json.loads(r.read()).get("errors") or []
            codes = {str(e.get("code")) for e in errors}
            detail = "; ".join(str(e.get("message")) for e in errors)
        except (ValueError, AttributeError, httpx.HTTPError):
            codes, detail = set(), ""
        status = f"HTTP {r.status_code}: {detail or r.reason_phrase}"
        if r.status_code in (401, 403):
            verb = "check" if USERNAME_ENV in os.environ else "set"
            raise Unauthorized(
                f"{self.where} denied access ({status}); {verb} {USERNAME_ENV} and {PASSWORD_ENV}"
            )
        if r.status_code == 404 and "NAME_UNKNOWN" in codes:
            raise NotFound(f"repository {self.where} does not exist")
        if r.status_code == 404:
            raise NotFound(f"{what} not found in {self.where}")
        if "DIGEST_INVALID" in codes:
            raise IntegrityError(f"{self.where} rejected {what}: the bytes do not match the digest")
        if r.status_code >= 500 or r.status_code == 429:
            raise Unavailable(f"{self.where} failed {what} ({status}); retry later")
        raise InvalidInput(f"{self.where} rejected {what} ({status})")


def _location(r: httpx.Response) -> str:
    location = r.headers.get("Location")
    if not location:
        raise Unavailable(f"registry answered {r.request.method} {r.url.path} without a Location")
    return str(r.url.join(location))


def _is_loopback(registry: str) -> bool:
    host = registry if registry.endswith("]") else registry.rsplit(":", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _credentials() -> tuple[str, str] | None:
    user = os.environ.get(USERNAME_ENV)
    return (user, os.environ.get(PASSWORD_ENV, "")) if user else None


def _basic(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(":".join(credentials).encode()).decode("ascii")


class _RegistryAuth(httpx.Auth):
    """Answers the registry's challenges: Basic (htpasswd) or Bearer tokens from the realm,
    cached per repository and access so that later requests go out authorized. The scope
    matters: the pull token that a HEAD earns does not allow the uploads that follow it."""

    def __init__(self, registry: str, credentials: tuple[str, str] | None) -> None:
        self._host = registry
        self._credentials = credentials
        self._basic = False
        self._tokens: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # Credentials go only to the registry itself, never to where it redirects.
        if request.url.netloc.decode("ascii") != self._host:
            yield request
            return
        scope = _scope_of(request)
        if self._basic and self._credentials is not None:
            request.headers["Authorization"] = _basic(self._credentials)
        elif scope in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        response = yield request
        if response.status_code != 401 or response.url.netloc != request.url.netloc:
            return
        scheme, _, rest = response.headers.get("WWW-Authenticate", "").partition(" ")
        params = {m[0].lower(): m[1] or m[2] for m in _CHALLENGE_PARAM.findall(rest)}
        if scheme.lower() == "basic" and self._credentials is not None and not self._basic:
            self._basic = True
            request.headers["Authorization"] = _basic(self._credentials)
            yield request
        elif scheme.lower() == "bearer" and params.get("realm", "").startswith("http"):
            # A cached token that earned a 401 has expired or lacks a scope: get a new one.
            token = yield from self._fetch_token(params)
            self._tokens[scope] = token
            if scope.endswith(",push"):
                self._tokens.setdefault(scope.removesuffix(",push"), token)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    def _fetch_token(self, params: dict[str, str]) -> Generator[httpx.Request, httpx.Response, str]:
        query: dict[str, str] = {k: params[k] for k in ("service", "scope") if k in params}
        token_request = httpx.Request("GET", params["realm"], params=query)
        if self._credentials is not None:
            token_request.headers["Authorization"] = _basic(self._credentials)
        response = yield token_request
        response.read()
        if response.status_code in (401, 403):
            who = f"the user in {USERNAME_ENV}" if self._credentials else "anonymous access"
            raise Unauthorized(
                f"the token service of {self._host} refused {who}; "
                f"check {USERNAME_ENV} and {PASSWORD_ENV}"
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if response.status_code != 200 or not isinstance(token, str):
            raise Unavailable(
                f"the token service of {self._host} answered HTTP {response.status_code} "
                "without a token"
            )
        return token


def _scope_of(request: httpx.Request) -> str:
    match = _REPO_IN_URL.match(request.url.path)
    if match is None:
        return ""
    action = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    return f"repository:{match[1]}:{action}"
