"""Push and pull against a real ``docker-registry`` (distribution 2.8) on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gpufleet.errors import IntegrityError, InvalidInput, NotFound, Unauthorized, Unavailable
from gpufleet.models.remote import (
    MANIFEST_MEDIA_TYPE,
    PASSWORD_ENV,
    USERNAME_ENV,
    Descriptor,
    parse_target,
    pull,
    push,
)
from gpufleet.testing.oci_registry import OciRegistryServer, find_registry_binary

pytestmark = pytest.mark.skipif(
    find_registry_binary() is None, reason="docker-registry not installed (Debian package)"
)

ARTIFACT_TYPE = "application/vnd.gpufleet.model.v1"
CONFIG_TYPE = "application/vnd.gpufleet.model.config.v1+json"
FILE_TYPE = "application/vnd.gpufleet.model.file.v1"
# alice:s3cret, bcrypt cost 4 (distribution accepts only bcrypt entries).
HTPASSWD = "alice:$2b$04$0Kc9A562HOljlDisqnokW.PTJASFxvi/B.VkqH5ZJs7h..BBG4b7K\n"


@pytest.fixture(scope="module")
def registry() -> Iterator[OciRegistryServer]:
    with OciRegistryServer() as server:
        yield server


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[OciRegistryServer]:
    with OciRegistryServer(htpasswd=HTPASSWD) as server:
        yield server


@pytest.fixture(scope="module")
def token_registry() -> Iterator[OciRegistryServer]:
    if shutil.which("openssl") is None:
        pytest.skip("the token service signs its JWTs with the openssl command")
    with OciRegistryServer(token_users={"alice": "s3cret"}) as server:
        yield server


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(USERNAME_ENV, raising=False)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    hex_ = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / hex_).write_bytes(data)
    return f"sha256:{hex_}", len(data)


def make_layout(layout: Path, files: dict[str, bytes]) -> str:
    """An OCI image layout holding one model version; returns its manifest digest."""
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config_digest, config_size = _put_blob(layout, b'{"name": "demo", "version": "1"}')
    layers = []
    for name, data in files.items():
        digest, size = _put_blob(layout, data)
        annotations = {"org.opencontainers.image.title": name, "x.gpufleet.note": "é \u2603 <&>"}
        layers.append(
            {"mediaType": FILE_TYPE, "digest": digest, "size": size, "annotations": annotations}
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    # Unusual spacing and raw UTF-8: any re-serialization on the way would change the digest.
    raw = json.dumps(manifest, indent=3, ensure_ascii=False).encode()
    digest, size = _put_blob(layout, raw)
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST_MEDIA_TYPE, "digest": digest, "size": size}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def blob_files(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def unique_files() -> dict[str, bytes]:
    """Fresh content per test: blobs are shared by every repository of a registry."""
    return {
        "model.yaml": b"name: demo\n" + os.urandom(8).hex().encode(),
        "weights/model.safetensors": os.urandom(300_000),
    }


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def test_push_then_pull_round_trips(registry: OciRegistryServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    digest = make_layout(src, unique_files())
    target = f"{registry.host}/models/demo:1"

    pushed = push(src, digest, target)

    raw = (src / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
    assert pushed == Descriptor(digest, len(raw), MANIFEST_MEDIA_TYPE, ARTIFACT_TYPE)
    tags = httpx.get(f"{registry.url}/v2/models/demo/tags/list").json()
    assert tags == {"name": "models/demo", "tags": ["1"]}

    dst = tmp_path / "dst"  # does not exist yet: pull creates blobs/sha256
    pulled = pull(target, dst)

    assert pulled == pushed
    assert blob_files(dst) == blob_files(src)
    assert not (dst / "index.json").exists()


def test_pull_by_digest(registry: OciRegistryServer, tmp_path: Path) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    push(tmp_path / "src", digest, f"{registry.host}/models/bydigest:v1")

    pulled = pull(f"{registry.host}/models/bydigest@{digest}", tmp_path / "dst")

    assert pulled.digest == digest
    assert blob_files(tmp_path / "dst") == blob_files(tmp_path / "src")
    # Pushing by digest stores the manifest without a tag; a different digest is refused.
    assert push(tmp_path / "src", digest, f"{registry.host}/models/untagged@{digest}") == pulled
    assert pull(f"{registry.host}/models/untagged@{digest}", tmp_path / "dst2") == pulled
    other = "sha256:" + "1" * 64
    with pytest.raises(InvalidInput, match="names digest"):
        push(tmp_path / "src", digest, f"{registry.host}/models/untagged@{other}")


def test_second_push_and_pull_transfer_nothing(registry: OciRegistryServer, tmp_path: Path) -> None:
    files = unique_files()
    digest = make_layout(tmp_path / "src", files)
    target = f"{registry.host}/models/twice:1"
    first, second = Recorder(), Recorder()

    push(tmp_path / "src", digest, target, progress=first)
    push(tmp_path / "src", digest, target, progress=second)

    blob_bytes = sum(len(f) for f in files.values()) + len(b'{"name": "demo", "version": "1"}')
    assert first.calls[0] == (0, blob_bytes)
    assert first.calls[-1] == (blob_bytes, blob_bytes)
    assert second.calls == [(0, 0)]

    first_pull, second_pull = Recorder(), Recorder()
    pull(target, tmp_path / "dst", progress=first_pull)
    pull(target, tmp_path / "dst", progress=second_pull)
    assert first_pull.calls[-1] == (blob_bytes, blob_bytes)
    assert second_pull.calls == [(0, 0)]


def test_multi_chunk_blob_round_trips(registry: OciRegistryServer, tmp_path: Path) -> None:
    big = os.urandom(20 * 1024 * 1024)
    digest = make_layout(tmp_path / "src", {"weights.bin": big})
    target = f"{registry.host}/models/big:1"
    progress = Recorder()

    push(tmp_path / "src", digest, target, progress=progress, chunk_size=3 * 1024 * 1024)

    # One step per accepted 3 MiB chunk: 7 for the weights, 1 for the config.
    assert len(progress.calls) == 1 + 7 + 1
    assert [done for done, _ in progress.calls] == sorted(done for done, _ in progress.calls)
    pull(target, tmp_path / "dst")
    assert blob_files(tmp_path / "dst")[hashlib.sha256(big).hexdigest()] == big


def test_pull_missing_tag_or_repository_is_not_found(
    registry: OciRegistryServer, tmp_path: Path
) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    push(tmp_path / "src", digest, f"{registry.host}/models/exists:1")

    with pytest.raises(NotFound, match=r"manifest 'nope' not found in .*/models/exists"):
        pull(f"{registry.host}/models/exists:nope", tmp_path / "dst")
    # distribution answers MANIFEST_UNKNOWN for an unknown repository too (others NAME_UNKNOWN)
    with pytest.raises(NotFound, match=r"/models/never"):
        pull(f"{registry.host}/models/never:1", tmp_path / "dst")
    assert not (tmp_path / "dst" / "blobs" / "sha256").exists()


def test_unreachable_registry_is_unavailable(tmp_path: Path) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}/models/demo:1"  # nothing listens there any more

    with pytest.raises(Unavailable, match=r"cannot reach registry 127\.0\.0\.1"):
        push(tmp_path / "src", digest, target)
    with pytest.raises(Unavailable, match=r"cannot reach registry 127\.0\.0\.1"):
        pull(target, tmp_path / "dst")


def test_tls_to_plain_http_registry_says_insecure(
    registry: OciRegistryServer, tmp_path: Path
) -> None:
    with pytest.raises(Unavailable, match="insecure=True"):
        pull(f"{registry.host}/models/demo:1", tmp_path / "dst", insecure=False)


def test_tampered_blob_is_refused_and_not_kept(registry: OciRegistryServer, tmp_path: Path) -> None:
    files = unique_files()
    digest = make_layout(tmp_path / "src", files)
    target = f"{registry.host}/models/tampered:1"
    push(tmp_path / "src", digest, target)
    weights = files["weights/model.safetensors"]
    weights_digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    stored = registry.blob_path(weights_digest)
    stored.write_bytes(b"\0" * len(weights))  # same size: only the digest can tell

    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError, match=weights_digest):
        pull(target, dst)

    names = {p.name for p in (dst / "blobs" / "sha256").iterdir()}
    assert weights_digest.removeprefix("sha256:") not in names
    assert digest.removeprefix("sha256:") not in names  # no manifest: the pull is incomplete
    assert not [n for n in names if n.startswith(".")]  # no temporary files left


def test_tampered_manifest_fails_pull_by_digest(
    registry: OciRegistryServer, tmp_path: Path
) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    push(tmp_path / "src", digest, f"{registry.host}/models/badmanifest:1")
    stored = registry.blob_path(digest)
    stored.write_bytes(stored.read_bytes().replace(b"gpufleet.note", b"gpufleet.nota"))

    with pytest.raises(IntegrityError, match="served a manifest with digest"):
        pull(f"{registry.host}/models/badmanifest@{digest}", tmp_path / "dst")


def test_credentials_from_environment(
    auth_registry: OciRegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    target = f"{auth_registry.host}/models/private:1"

    with pytest.raises(Unauthorized, match=f"set {USERNAME_ENV}"):
        push(tmp_path / "src", digest, target)

    monkeypatch.setenv(USERNAME_ENV, "alice")
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(Unauthorized, match=f"check {USERNAME_ENV}") as excinfo:
        push(tmp_path / "src", digest, target)
    assert "wrong" not in str(excinfo.value)

    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    push(tmp_path / "src", digest, target)
    assert pull(target, tmp_path / "dst").digest == digest
    assert blob_files(tmp_path / "dst") == blob_files(tmp_path / "src")


def _sorted_actions(scope: str) -> str:
    kind, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    return f"{kind}:{name}:{','.join(sorted(actions.split(',')))}"


def test_token_auth_asks_for_push_scope_after_pull_scope(
    token_registry: OciRegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest = make_layout(tmp_path / "src", unique_files())
    target = f"{token_registry.host}/models/tokened:1"
    issuer = token_registry.issuer
    assert issuer is not None

    with pytest.raises(Unauthorized, match="refused anonymous access"):
        push(tmp_path / "src", digest, target)

    monkeypatch.setenv(USERNAME_ENV, "alice")
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    issuer.requests.clear()
    push(tmp_path / "src", digest, target)
    # The HEADs earn a pull token, which cannot upload: one more token, with push, and no more.
    # The scope is the registry's challenge, passed on: docker-registry lists the actions in
    # either order ("push,pull" or "pull,push"), which mean the same.
    assert [(who, [_sorted_actions(s) for s in scopes]) for who, scopes in issuer.requests] == [
        ("alice", ["repository:models/tokened:pull"]),
        ("alice", ["repository:models/tokened:pull,push"]),
    ]

    assert pull(target, tmp_path / "dst").digest == digest
    assert blob_files(tmp_path / "dst") == blob_files(tmp_path / "src")
    assert len(issuer.requests) == 3  # a new client: one pull token for the whole pull


def test_push_refuses_an_incomplete_layout(registry: OciRegistryServer, tmp_path: Path) -> None:
    files = unique_files()
    digest = make_layout(tmp_path / "src", files)
    target = f"{registry.host}/models/incomplete:1"
    missing = "sha256:" + "0" * 64

    with pytest.raises(NotFound, match=r"manifest sha256:0+ not found"):
        push(tmp_path / "src", missing, target)
    (
        tmp_path / "src" / "blobs" / "sha256" / hashlib.sha256(files["model.yaml"]).hexdigest()
    ).unlink()
    with pytest.raises(NotFound, match="is missing from"):
        push(tmp_path / "src", digest, target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:5000/models/demo:1", ("127.0.0.1:5000", "models/demo", "1")),
        ("localhost/demo:v1.0_rc-2", ("localhost", "demo", "v1.0_rc-2")),
        ("registry.example.com/a/b/c:latest", ("registry.example.com", "a/b/c", "latest")),
        ("[::1]:5000/m:1", ("[::1]:5000", "m", "1")),
        (f"r.io/m@sha256:{'a' * 64}", ("r.io", "m", f"sha256:{'a' * 64}")),
        (f"r.io/m:1@sha256:{'b' * 64}", ("r.io", "m", f"sha256:{'b' * 64}")),
    ],
)
def test_parse_target(target: str, expected: tuple[str, str, str]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "demo:1",  # no registry host
        "models/demo:1",  # "models" is not a host
        "r.io/demo",  # neither tag nor digest
        "r.io/Demo:1",  # uppercase repository
        "r.io/demo:",  # empty tag
        "r.io/demo:-x",
        "r.io/demo:1:2",
        "r.io//demo:1",
        "r.io/demo@sha256:abc",
        f"r.io/demo@sha512:{'a' * 128}",
        "r.io/demo:tag with space",
        "r.io/démo:1",
        "http://r.io/demo:1",
    ],
)
def test_bad_targets_are_invalid_input(target: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="registry target"):
        parse_target(target)
    with pytest.raises(InvalidInput):
        pull(target, tmp_path)
