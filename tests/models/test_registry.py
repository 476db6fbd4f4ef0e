"""The local registry: OCI layout, immutable versions, tags, dedup, prune, gc, tamper checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpufleet.errors import Conflict, IntegrityError, InvalidInput, NotFound
from gpufleet.models.integrity import verify_file
from gpufleet.models.registry import (
    A_BLAKE3,
    Registry,
    _file_record,
    looks_like_ref,
    split_ref,
)
from tests.models.registry_helpers import make_scale_model


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def test_package_writes_an_oci_image_layout(tmp_path: Path, registry: Registry) -> None:
    a = registry.package(make_scale_model(tmp_path / "m"))
    assert (a.name, a.version) == ("scale", "1.0.0")
    assert json.loads((registry.root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((registry.root / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["digest"] == a.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "scale:1.0.0"
    manifest = json.loads(registry.manifest_bytes(a.digest))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["artifactType"] == "application/vnd.gpufleet.model.v1"
    titles = [x["annotations"]["org.opencontainers.image.title"] for x in manifest["layers"]]
    assert titles == ["model.yaml", "runner.py", "weights.safetensors"]
    for layer in manifest["layers"]:  # every blob is stored under its own sha256
        blob = registry.blob_path(layer["digest"])
        assert blob.stat().st_size == layer["size"]
    config = json.loads(registry.blob_path(manifest["config"]["digest"]).read_bytes())
    assert config["model"]["name"] == "scale"


def test_same_content_same_digest_and_versions_are_immutable(
    tmp_path: Path, registry: Registry
) -> None:
    model = make_scale_model(tmp_path / "m")
    first = registry.package(model)
    assert registry.package(model).digest == first.digest
    assert len(registry.versions()) == 1
    make_scale_model(model, scale=4.0)  # other bytes, same version
    with pytest.raises(Conflict, match=r"scale@1.0.0 already exists with other content"):
        registry.package(model)
    assert [a.digest for a in registry.versions()] == [first.digest]


def test_identical_files_are_stored_once(tmp_path: Path, registry: Registry) -> None:
    registry.package(make_scale_model(tmp_path / "a", version="1.0.0"))
    blobs_before = set(registry.blobs.iterdir())
    registry.package(make_scale_model(tmp_path / "b", version="1.1.0"))
    new = set(registry.blobs.iterdir()) - blobs_before
    # Only model.yaml, the config and the manifest differ; runner and weights are shared.
    assert len(new) == 3


def test_refs_tags_and_digests(tmp_path: Path, registry: Registry) -> None:
    v1 = registry.package(make_scale_model(tmp_path / "a", version="1.0.0"), tags=("stable",))
    v2 = registry.package(make_scale_model(tmp_path / "b", version="2.0.0", scale=2.0))
    assert registry.resolve("scale").digest == v1.digest  # bare name: the stable tag
    assert registry.resolve("scale@2.0.0").digest == v2.digest
    assert registry.resolve("scale:stable").digest == v1.digest
    assert registry.resolve(f"scale@{v2.digest[:20]}").version == "2.0.0"
    registry.tag("scale@2.0.0", "stable")  # tags move
    assert registry.resolve("scale@stable").version == "2.0.0"
    assert registry.resolve("scale@1.0.0").tags == ()
    registry.untag("scale", "stable")
    assert registry.resolve("scale").version == "2.0.0"  # no stable tag: the newest
    with pytest.raises(NotFound, match=r"scale has versions 1.0.0, 2.0.0"):
        registry.resolve("scale@3.0.0")
    with pytest.raises(NotFound, match=r"no model 'other'"):
        registry.resolve("other")
    with pytest.raises(InvalidInput, match="is not a tag"):
        registry.tag("scale@1.0.0", "2.0.0")
    registry.package(make_scale_model(tmp_path / "c", version="v9", scale=9.0))
    with pytest.raises(InvalidInput, match="a tag must differ"):
        registry.tag("scale@1.0.0", "v9")
    with pytest.raises(InvalidInput, match="is not a tag"):
        registry.tag("scale@1.0.0", "no way")


def test_remove_prune_and_gc(tmp_path: Path, registry: Registry) -> None:
    for i in range(4):
        registry.package(
            make_scale_model(tmp_path / f"m{i}", version=f"1.{i}.0", scale=float(i)),
            tags=("stable",) if i == 0 else (),
        )
    with pytest.raises(Conflict, match="is tagged stable"):
        registry.remove("scale@1.0.0")
    removed = registry.prune("scale", keep=2)
    assert [a.version for a in removed] == ["1.1.0"]  # 1.0.0 is tagged: kept
    assert [a.version for a in registry.versions()] == ["1.0.0", "1.2.0", "1.3.0"]
    doomed, freed = registry.gc(dry_run=True)
    assert doomed and freed > 0
    assert registry.gc() == (doomed, freed)
    assert registry.gc() == ([], 0)
    for a in registry.versions():  # what is left is whole
        registry.verify(f"scale@{a.digest}")


def test_tampered_blob_fails_verification(tmp_path: Path, registry: Registry) -> None:
    a = registry.package(make_scale_model(tmp_path / "m"))
    weights = next(f for f in a.files if f.path == "weights.safetensors")
    blob = registry.blob_path(weights.blob)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"scale@1.0.0:weights.safetensors: .*tampered"):
        registry.verify("scale@1.0.0")


def test_tampered_manifest_is_refused(tmp_path: Path, registry: Registry) -> None:
    a = registry.package(make_scale_model(tmp_path / "m"))
    blob = registry.blob_path(a.digest)
    os.chmod(blob, 0o644)
    blob.write_bytes(blob.read_bytes().replace(b"model.yaml", b"model.yam1"))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        registry.resolve("scale@1.0.0")


def test_checkout_links_files_and_records_chunk_digests(tmp_path: Path, registry: Registry) -> None:
    registry.package(make_scale_model(tmp_path / "m"))
    checkout = registry.checkout("scale@1.0.0")
    assert (checkout.path / "runner.py").read_text().startswith("\nfrom pathlib")
    for path, digest in checkout.files.items():
        assert digest.chunks and path.is_symlink()
        verify_file(path, digest)
    assert registry.checkout("scale").path == checkout.path  # reused


def test_layers_record_blake3_and_older_layers_without_it_still_verify(
    tmp_path: Path, registry: Registry
) -> None:
    a = registry.package(make_scale_model(tmp_path / "m"))
    manifest = json.loads(registry.manifest_bytes(a.digest))
    for layer, rec in zip(manifest["layers"], a.files, strict=True):
        assert layer["annotations"][A_BLAKE3] == rec.digest.blake3
        assert len(rec.digest.blake3) == 64
        del layer["annotations"][A_BLAKE3]  # as packaged before BLAKE3 was recorded
        old = _file_record(layer)
        assert old.digest.blake3 == "" and old.digest.chunks == rec.digest.chunks
        verify_file(registry.blob_path(old.blob), old.digest)


def test_repackaging_a_version_an_older_gpufleet_wrote_is_a_no_op(
    tmp_path: Path, registry: Registry
) -> None:
    # An older gpufleet recorded no BLAKE3: the same files give other manifest bytes.
    model = make_scale_model(tmp_path / "m")
    new = registry.package(model)
    manifest = json.loads(registry.manifest_bytes(new.digest))
    for layer in manifest["layers"]:
        del layer["annotations"][A_BLAKE3]
    raw = json.dumps(manifest).encode()
    registry.remove("scale@1.0.0")
    old = registry.write_blob(raw)
    registry.add("scale", "1.0.0", old, len(raw), size=new.size)
    assert registry.package(model, tags=("stable",)).digest == old
    [version] = registry.versions("scale")
    assert version.digest == old and version.tags == ("stable",)
    make_scale_model(model, scale=4.0)  # other bytes under that version: still refused
    with pytest.raises(Conflict, match="already exists with other content"):
        registry.package(model)


def test_files_listed_in_model_yaml_limit_the_package(tmp_path: Path, registry: Registry) -> None:
    model = make_scale_model(
        tmp_path / "m", extra="  files: [{path: runner.py}, {path: weights.safetensors}]\n"
    )
    (model / "notes.txt").write_text("not part of the model")
    a = registry.package(model)
    assert [f.path for f in a.files] == ["model.yaml", "runner.py", "weights.safetensors"]
    (model / "runner.py").unlink()
    with pytest.raises(InvalidInput, match=r"model\.files lists runner\.py, which is not in"):
        registry.package(model)


def test_symlinks_that_leave_the_directory_are_refused_before_anything_is_stored(
    tmp_path: Path, registry: Registry
) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    model = make_scale_model(tmp_path / "m")
    (model / "link.txt").symlink_to(outside)
    (model / "sub").mkdir()
    (model / "sub" / "up").symlink_to("..")
    (model / "gone").symlink_to(tmp_path / "nothing")
    (model / "etc").symlink_to(tmp_path)
    with pytest.raises(InvalidInput) as caught:
        registry.package(model)
    problems = caught.value.details["problems"]
    assert problems == [
        f"etc -> {tmp_path} (outside {model.resolve()})",
        f"gone -> {tmp_path / 'nothing'} (points at nothing)",
        f"link.txt -> {outside} (outside {model.resolve()})",
        "sub/up -> .. (a loop: it points at a directory that holds it)",
    ]
    assert "Copy the files into the directory" in caught.value.message
    assert not registry.blobs.exists() or not any(registry.blobs.iterdir())
    listed = make_scale_model(tmp_path / "n", extra="  files: [{path: link.txt}]\n")
    (listed / "link.txt").symlink_to(outside)
    with pytest.raises(InvalidInput, match=r"link\.txt -> .*secret\.txt \(outside"):
        registry.package(listed)


def test_symlinks_inside_the_directory_are_stored_as_their_files(
    tmp_path: Path, registry: Registry
) -> None:
    model = make_scale_model(tmp_path / "m")
    (model / "data").mkdir()
    (model / "data" / "labels.txt").write_text("cat\ndog\n")
    (model / "labels.txt").symlink_to("data/labels.txt")
    (model / "shared").symlink_to("data")
    a = registry.package(model)
    paths = [f.path for f in a.files]
    assert {"labels.txt", "data/labels.txt", "shared/labels.txt"} <= set(paths)
    checkout = registry.checkout(a.ref).path
    assert (checkout / "labels.txt").read_text() == "cat\ndog\n"


def test_reference_syntax(tmp_path: Path) -> None:
    assert split_ref("digits@1.0") == ("digits", "1.0")
    assert split_ref("digits:stable") == ("digits", "stable")
    assert split_ref("digits") == ("digits", None)
    with pytest.raises(InvalidInput):
        split_ref("Digits@")
    assert looks_like_ref("digits@1.0")
    assert not looks_like_ref("builtin:digits")
    assert not looks_like_ref("./models/digits")
    assert not looks_like_ref(str(tmp_path))
