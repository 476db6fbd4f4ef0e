"""open_model: builtin, directory or registry version; digests and device checked at load."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from gpufleet.errors import IntegrityError, InvalidInput
from gpufleet.models.loader import open_model
from gpufleet.models.registry import Registry
from tests.models.registry_helpers import make_scale_model


def tamper(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_registry_version_loads_and_predicts(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.package(make_scale_model(tmp_path / "m", scale=5.0))
    runner = open_model("scale@1.0.0", registry=registry)
    assert (runner.info.name, runner.info.version) == ("scale", "1.0.0")
    assert runner.batching.max_batch_size == 8
    runner.load("cpu")
    runner.warmup()
    assert runner.predict([{"x": 2}]) == [{"y": 10.0}]


def test_tampered_weights_are_never_served(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    a = registry.package(make_scale_model(tmp_path / "m"))
    weights = next(f for f in a.files if f.path == "weights.safetensors")
    tamper(registry.blob_path(weights.blob))
    runner = open_model("scale@1.0.0", registry=registry)  # weights are checked at load
    with pytest.raises(IntegrityError, match=r"scale@1.0.0:weights.safetensors"):
        runner.load("cpu")


def test_tampered_code_is_refused_before_it_is_imported(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    a = registry.package(make_scale_model(tmp_path / "m"))
    code = next(f for f in a.files if f.path == "runner.py")
    blob = registry.blob_path(code.blob)
    os.chmod(blob, 0o644)
    marker = tmp_path / "imported"
    blob.write_text(f"open({str(marker)!r}, 'w').close()\n" + blob.read_text())
    with pytest.raises(IntegrityError, match=r"scale@1.0.0:runner.py"):
        open_model("scale@1.0.0", registry=registry)
    assert not marker.exists()


def test_directories_and_builtins_still_load(tmp_path: Path) -> None:
    runner = open_model(str(make_scale_model(tmp_path / "m", scale=2.0)))
    runner.load("cpu")
    assert runner.predict([{"x": 1}]) == [{"y": 2.0}]
    assert open_model("builtin:digits").info.name == "digits"


def test_unknown_specs_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown built-in model 'nope'"):
        open_model("builtin:nope")
    with pytest.raises(InvalidInput, match="is not a model directory"):
        open_model(str(tmp_path / "missing"))


def test_cpu_warns_about_emulated_precisions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_scale_model(tmp_path / "m", extra="  precision: fp16\n")
    runner = open_model(str(model))
    with caplog.at_level(logging.WARNING):
        runner.load("cpu")
    assert "precision fp16 on the CPU" in caplog.text


def _scale_version(tmp_path: Path, tampered: bool) -> Registry:
    registry = Registry(tmp_path / "registry")
    a = registry.package(make_scale_model(tmp_path / "m", scale=5.0))
    if tampered:
        weights = next(f for f in a.files if f.path == "weights.safetensors")
        blob = registry.blob_path(weights.blob)
        os.chmod(blob, 0o644)
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0x01  # still parses: only the digest can tell
        blob.write_bytes(bytes(data))
    return registry


TAMPERED = r"scale@1\.0\.0:weights\.safetensors"


@pytest.mark.parametrize("tampered", [False, True])
@pytest.mark.parametrize("first_call", ["warmup", "predict"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_no_result_comes_from_weights_before_their_check(
    tmp_path: Path, tampered: bool, first_call: str, prefetch: bool
) -> None:
    runner = open_model("scale@1.0.0", registry=_scale_version(tmp_path, tampered))
    if prefetch:
        runner.prefetch()  # as a fresh worker process does, before it imports torch
    if tampered and prefetch:
        with pytest.raises(IntegrityError, match=TAMPERED):
            runner.load("cpu")  # the prefetch's verdict is in before the load returns
        return
    # Without a prefetch the check runs while the model warms up on the weights: ``warmup``
    # itself returns only with a good verdict (a worker exits "refused" on it, before its
    # first claim), and so does a ``predict`` called without it.
    runner.load("cpu")
    call = runner.warmup if first_call == "warmup" else lambda: runner.predict([{"x": 1}])
    if tampered:
        with pytest.raises(IntegrityError, match=TAMPERED):
            call()
        with pytest.raises(IntegrityError, match=TAMPERED):  # and for good
            runner.predict([{"x": 1}])
    else:
        call()
        assert runner.predict([{"x": 1}]) == [{"y": 5.0}]


def test_a_warmup_broken_by_tampered_weights_says_they_were_tampered(tmp_path: Path) -> None:
    runner = open_model("scale@1.0.0", registry=_scale_version(tmp_path, tampered=True))
    runner.load("cpu")

    def broken() -> None:  # what a model's warm-up may do with corrupted numbers
        raise ValueError("warm-up output is not finite")

    runner.runner.warmup = broken  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match=TAMPERED):
        runner.warmup()


def test_each_format_round_trips_through_the_registry(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("transformers")
    from tests.models.format_fixtures import (
        make_hf_causal_lm_dir,
        make_onnx_dir,
        make_torchscript_dir,
    )

    registry = Registry(tmp_path / "registry")
    cases = [
        (make_onnx_dir(tmp_path / "onnx"), [[1.0, 2.0, 3.0, 4.0]]),
        (make_torchscript_dir(tmp_path / "ts"), [[1.0, 2.0, 3.0, 4.0]]),
        (make_hf_causal_lm_dir(tmp_path / "hf"), [{"prompt": "hello", "max_new_tokens": 3}]),
    ]
    for model_dir, inputs in cases:
        a = registry.package(model_dir)
        direct = open_model(str(model_dir))
        stored = open_model(f"{a.name}@{a.digest}", registry=registry)
        direct.load("cpu")
        stored.load("cpu")
        got, want = stored.predict(inputs), direct.predict(inputs)
        for out in (*got, *want):
            if isinstance(out, dict):
                out.pop("tokens_per_s", None)  # a timing, not an output
        assert got == want, a.name
