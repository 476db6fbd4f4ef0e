"""The digits demo model on CPU: recognisable digits, seeds independent of batches, valid
PNGs, and bad inputs that fail alone."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from gpufleet.models import ItemError, ModelRunner
from gpufleet.models.demo import DigitsRunner


@pytest.fixture(scope="module")
def runner() -> Iterator[DigitsRunner]:
    r = DigitsRunner()
    r.load("cpu")
    r.warmup()
    yield r
    r.unload()


def nearest_centroid(pixels: list[list[int]], centroids: np.ndarray) -> int:
    x = np.asarray(pixels, dtype=np.float32).reshape(64) / 127.5 - 1.0  # back to [-1, 1]
    return int(((centroids - x) ** 2).sum(axis=1).argmin())


def decode_png(data: bytes) -> tuple[int, int, np.ndarray]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    width, height, depth, color, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 0)  # 8-bit grayscale
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), dtype=np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()  # filter type "none" on every row
    return width, height, rows[:, 1:]


def test_implements_the_protocol_and_the_example_works(runner: DigitsRunner) -> None:
    assert isinstance(runner, ModelRunner)
    assert runner.info.name == "digits"
    assert runner.batching.max_batch_size == 32
    [out] = runner.predict([runner.info.example_input])
    assert out["digit"] == 7
    assert (out["seed"], out["steps"], out["width"], out["height"]) == (42, 20, 64, 64)


def test_generated_digits_are_recognisable(runner: DigitsRunner) -> None:
    centroids = load_file(runner.weights_path)["centroids"]
    inputs = [{"prompt": f"a handwritten {d}", "seed": s} for d in range(10) for s in range(5)]
    outputs = runner.predict(inputs)
    hits = [nearest_centroid(out["pixels"], centroids) == out["digit"] for out in outputs]
    assert [out["digit"] for out in outputs] == [d for d in range(10) for _ in range(5)]
    assert sum(hits) / len(hits) >= 0.9


def test_same_seed_same_output_whatever_the_batch(runner: DigitsRunner) -> None:
    item = {"prompt": "three", "seed": 1234, "steps": 12, "guidance": 2.5}
    alone = runner.predict([item])[0]
    others = [{"prompt": str(d), "seed": d, "steps": 12} for d in range(20)]
    in_batch = runner.predict([*others[:7], item, *others[7:]])[7]
    also_other_steps = runner.predict([{"prompt": "1", "steps": 5}, item])[1]
    assert alone == in_batch == also_other_steps


def test_seed_is_drawn_and_reported_when_missing(runner: DigitsRunner) -> None:
    first, second = runner.predict([{"prompt": "8"}, {"prompt": "8"}])
    assert isinstance(first["seed"], int)
    assert first["seed"] != second["seed"]
    again = runner.predict([{"prompt": "8", "seed": first["seed"]}])[0]
    assert again["pixels"] == first["pixels"]


def test_png_decodes_to_the_upscaled_pixels(runner: DigitsRunner) -> None:
    [out] = runner.predict([{"prompt": "nine", "seed": 5, "scale": 3, "steps": 4}])
    width, height, image = decode_png(base64.b64decode(out["png_base64"]))
    assert (width, height) == (out["width"], out["height"]) == (24, 24)
    pixels = np.asarray(out["pixels"], dtype=np.uint8)
    assert pixels.shape == (8, 8)
    assert (image == pixels.repeat(3, axis=0).repeat(3, axis=1)).all()


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [("7", 7), ("a handwritten Seven", 7), ("draw a 0, a nice 0", 0), ("ZERO", 0)],
)
def test_prompt_names_a_digit(runner: DigitsRunner, prompt: str, digit: int) -> None:
    assert runner.predict([{"prompt": prompt, "steps": 1}])[0]["digit"] == digit


BAD_INPUTS: list[tuple[Any, str, str]] = [
    ({"prompt": "a cat"}, "invalid_prompt", "found none"),
    ({"prompt": "a 7 and an 8"}, "invalid_prompt", "7, 8"),
    ({"prompt": "one seven"}, "invalid_prompt", "one, seven"),
    ({"prompt": "number 12"}, "invalid_prompt", "12"),
    ({}, "invalid_input", "prompt: Field required"),
    ({"prompt": 7}, "invalid_input", "prompt"),
    ({"prompt": "7", "steps": 0}, "invalid_input", "steps"),
    ({"prompt": "7", "steps": 101}, "invalid_input", "steps"),
    ({"prompt": "7", "steps": "20"}, "invalid_input", "steps"),
    ({"prompt": "7", "seed": -1}, "invalid_input", "seed"),
    ({"prompt": "7", "seed": 1.5}, "invalid_input", "seed"),
    ({"prompt": "7", "guidance": 11}, "invalid_input", "guidance"),
    ({"prompt": "7", "guidance": True}, "invalid_input", "guidance"),
    ({"prompt": "7", "scale": 33}, "invalid_input", "scale"),
    ({"prompt": "7", "step": 20}, "invalid_input", "step: Extra inputs"),
    ("7", "invalid_input", "JSON object"),
    (None, "invalid_input", "JSON object"),
]


def test_bad_inputs_fail_only_their_item(runner: DigitsRunner) -> None:
    good = {"prompt": "4", "seed": 9, "steps": 6}
    outputs = runner.predict([good, *(bad for bad, _, _ in BAD_INPUTS), good])
    assert outputs[0] == outputs[-1] == runner.predict([good])[0]
    for out, (bad, code, words) in zip(outputs[1:-1], BAD_INPUTS, strict=True):
        assert isinstance(out, ItemError), bad
        assert (out.code, out.retryable) == (code, False)
        assert words in out.message, (bad, out.message)


def test_predict_before_load_raises() -> None:
    with pytest.raises(RuntimeError, match="before load"):
        DigitsRunner().predict([{"prompt": "1"}])
