"""The safetensors loader on CPU: the same tensors as safetensors' own loader for every dtype
and alignment, chunk digests checked on the way, and bad files refused by name."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.errors import IntegrityError, InvalidInput
from gpufleet.models import integrity, weights
from gpufleet.models.weights import TensorSpec, load_safetensors, write_safetensors

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


def _random(spec: TensorSpec, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, weights.DTYPES[spec.dtype][0])
    if dtype == torch.bool:
        return torch.randint(0, 2, spec.shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(spec.shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -1000), min(info.max, 1000)
    return torch.randint(low, high, spec.shape, generator=g, dtype=torch.int64).to(dtype)


# An odd-sized U8 tensor first puts every later tensor off its natural alignment.
SPECS = [TensorSpec("odd", "U8", (3,))] + [
    TensorSpec(f"t_{code.lower()}", code, shape)
    for code, shape in zip(
        weights.DTYPES,
        [(7, 5), (3,), (2, 3, 4), (), (0, 4), (33,), (1, 1), (5, 2)] * 2,
        strict=False,
    )
]


def _write(path: Path, specs: list[TensorSpec] = SPECS) -> dict[str, torch.Tensor]:
    tensors = {s.name: _random(s, i) for i, s in enumerate(specs)}
    write_safetensors(path, specs, [tensors[s.name] for s in specs], metadata={"k": "v"})
    return tensors


@pytest.fixture(autouse=True)
def _forget_digests() -> Iterator[None]:
    yield
    with integrity._lock:
        integrity._expected.clear()
        integrity._verified.clear()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)  # fp8 and NaN compare by their bytes


def test_loads_what_safetensors_loads_for_every_dtype_and_alignment(tmp_path: Path) -> None:
    path = tmp_path / "all.safetensors"
    made = _write(path)
    reference = safetensors_torch.load_file(path)
    loaded = load_safetensors(path, "cpu", block_size=4096)
    assert set(loaded) == set(reference) == set(made)
    for name, ref in reference.items():
        got = loaded[name]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), name
        assert torch.equal(_bits(got), _bits(ref)), name
        assert got.data_ptr() % got.element_size() == 0, name
    assert weights.read_header(path).metadata == {"k": "v"}


def test_many_segments_and_threads_give_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "SEGMENT_SIZE", 1000)
    path = tmp_path / "big.safetensors"
    specs = [TensorSpec(f"w{i}", "F32", (97, 31)) for i in range(5)]
    _write(path, specs)
    reference = safetensors_torch.load_file(path)
    loaded = load_safetensors(path, "cpu", threads=3, block_size=333)
    for name, ref in reference.items():
        assert torch.equal(loaded[name], ref)


def test_dtype_casts_floating_tensors_only(tmp_path: Path) -> None:
    path = tmp_path / "cast.safetensors"
    made = _write(path)
    loaded = load_safetensors(path, "cpu", dtype=torch.float32)
    assert loaded["t_bf16"].dtype == torch.float32
    assert torch.equal(loaded["t_bf16"], made["t_bf16"].float())
    assert loaded["t_i32"].dtype == torch.int32
    assert loaded["t_bool"].dtype == torch.bool


def _expect(path: Path, chunk_size: int, recorded: str = "all") -> None:
    """Expect ``path``'s digests: all of them, or only its chunks (as gpufleet recorded
    before BLAKE3), or only its BLAKE3."""
    digest = integrity.hash_file(path, chunk_size=chunk_size)
    if recorded == "chunks":
        digest = dataclasses.replace(digest, blake3="")
    elif recorded == "blake3":
        digest = dataclasses.replace(digest, chunks=())
    integrity.expect({path: digest})


@pytest.mark.parametrize("chunk_size", [64, 1000, 1 << 20])  # some chunks lie in the header
def test_matching_chunks_mark_the_file_verified(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "ok.safetensors"
    _write(path)
    _expect(path, chunk_size)
    assert integrity.unverified([path]) == [path]
    load_safetensors(path, "cpu", block_size=300)
    assert integrity.unverified([path]) == []


@pytest.mark.parametrize("recorded", ["sha256", "blake3"])
def test_a_whole_file_digest_without_chunks_is_checked_too(tmp_path: Path, recorded: str) -> None:
    path = tmp_path / "whole.safetensors"
    _write(path)
    full = integrity.hash_file(path)
    only = dataclasses.replace(full, chunks=(), blake3=full.blake3 if recorded == "blake3" else "")
    integrity.expect({path: only})
    load_safetensors(path, "cpu")
    assert integrity.unverified([path]) == []
    wrong = {"sha256": "0" * 64, "blake3": "0" * 64 if recorded == "blake3" else ""}
    integrity.expect({path: integrity.FileDigest(size=full.size, **wrong)})
    with pytest.raises(IntegrityError, match=recorded):
        load_safetensors(path, "cpu")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "last byte"])
def test_one_flipped_byte_raises_and_returns_nothing(tmp_path: Path, where: str) -> None:
    path = tmp_path / "bad.safetensors"
    _write(path)
    _expect(path, 256)
    size = path.stat().st_size
    _flip(path, size - 1 if where == "last byte" else weights.read_header(path).data_start + 10)
    loaded = None
    with pytest.raises(IntegrityError, match="does not match the recorded digest"):
        loaded = load_safetensors(path, "cpu")
    assert loaded is None
    assert integrity.unverified([path]) == [path]


def test_changed_size_raises_integrity_error(tmp_path: Path) -> None:
    path = tmp_path / "grown.safetensors"
    _write(path)
    _expect(path, 256)
    with path.open("ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IntegrityError, match="size"):
        load_safetensors(path, "cpu")


@pytest.mark.parametrize("recorded", ["all", "chunks"])
def test_prefetch_verifies_and_the_loader_then_skips_hashing(tmp_path: Path, recorded: str) -> None:
    path = tmp_path / "pre.safetensors"
    made = _write(path)
    _expect(path, 512, recorded)
    weights.prefetch(path).wait()
    assert integrity.unverified([path]) == []
    loaded = load_safetensors(path, "cpu")
    assert torch.equal(_bits(loaded["t_f32"]), _bits(made["t_f32"]))


@pytest.mark.parametrize("recorded", ["all", "chunks", "blake3"])
def test_prefetch_of_a_corrupted_file_makes_the_load_fail(tmp_path: Path, recorded: str) -> None:
    path = tmp_path / "pre-bad.safetensors"
    _write(path)
    _expect(path, 512, recorded)
    _flip(path, path.stat().st_size - 3)
    weights.prefetch(path)
    with pytest.raises(IntegrityError):
        load_safetensors(path, "cpu")
    assert integrity.unverified([path]) == [path]


@pytest.mark.parametrize("corrupted", [False, True])
def test_a_file_checked_after_load_is_read_unhashed_then_checked(
    tmp_path: Path, corrupted: bool
) -> None:
    path = tmp_path / "after.safetensors"
    made = _write(path)
    digest = integrity.hash_file(path, chunk_size=512)
    integrity.expect({path: digest})
    if corrupted:
        _flip(path, path.stat().st_size - 3)
    with weights.check_after_load([path]):
        loaded = load_safetensors(path, "cpu")  # no hashing, no verdict
    assert integrity.unverified([path]) == [path]
    if not corrupted:
        assert torch.equal(_bits(loaded["t_f32"]), _bits(made["t_f32"]))
    check = integrity.check_in_background(path, digest)  # from the page cache
    if corrupted:
        with pytest.raises(IntegrityError, match="chunk"):
            check.result()
        assert integrity.unverified([path]) == [path]
    else:
        check.result()
        assert integrity.unverified([path]) == []
    # Outside the block the loader checks as it reads again.
    integrity.expect({path: digest})
    if corrupted:
        with pytest.raises(IntegrityError):
            load_safetensors(path, "cpu")
    else:
        load_safetensors(path, "cpu")
        assert integrity.unverified([path]) == []


def _raw_file(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize(
    ("name", "build", "message"),
    [
        ("short", lambda p: p.write_bytes(b"\x01\x02"), "shorter than the 8-byte"),
        (
            "huge-header",
            lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
            "does not fit",
        ),
        ("bad-json", lambda p: _raw_file(p, None, raw=b"{not json"), "not valid JSON"),
        ("not-object", lambda p: _raw_file(p, [1, 2]), "JSON object"),
        (
            "bad-dtype",
            lambda p: _raw_file(
                p, {"x": {"dtype": "F4", "shape": [1], "data_offsets": [0, 1]}}, b"\0"
            ),
            "unknown dtype",
        ),
        (
            "out-of-range",
            lambda p: _raw_file(
                p, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
            ),
            "out of the data section",
        ),
        (
            "size-mismatch",
            lambda p: _raw_file(
                p, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "8 bytes for F32",
        ),
    ],
)
def test_bad_files_are_invalid_input_naming_the_file(
    tmp_path: Path, name: str, build: object, message: str
) -> None:
    path = tmp_path / f"{name}.safetensors"
    build(path)  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=message) as info:
        load_safetensors(path, "cpu")
    assert str(path) in str(info.value)


def test_truncated_file_is_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "trunc.safetensors"
    _write(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InvalidInput, match=r"truncated file\?"):
        load_safetensors(path, "cpu")


def test_missing_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        load_safetensors(tmp_path / "nope.safetensors", "cpu")


def test_writer_refuses_a_tensor_that_does_not_match_its_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected torch\.float32"):
        write_safetensors(
            tmp_path / "x.safetensors", [TensorSpec("a", "F32", (2,))], [torch.zeros(3)]
        )
    assert not list(tmp_path.glob("x.safetensors"))
