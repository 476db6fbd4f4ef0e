"""An image classifier on 8x8 digit images: softmax regression in numpy, trained in
``load`` from the glyphs of ``digits.txt`` (every offset, seeded noise), so the weights are
the same on every machine and nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gpufleet import ItemError, Model

SIDE = 8


class DigitImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pixels: list[list[float]] = Field(
        min_length=SIDE,
        max_length=SIDE,
        description="8 rows of 8 grey levels, 0 (background) to 16 (ink).",
    )


def read_glyphs(path: Path) -> dict[int, np.ndarray]:
    """``digits.txt``: a digit on its line, then its rows of '.' and '#'."""
    glyphs: dict[int, list[list[float]]] = {}
    current = -1
    for line in path.read_text().splitlines():
        if not line or line.startswith("# "):  # glyph rows have no spaces
            continue
        if line.isdigit():
            current = int(line)
            glyphs[current] = []
        else:
            glyphs[current].append([1.0 if c == "#" else 0.0 for c in line])
    return {d: np.array(rows) for d, rows in glyphs.items()}


def training_set(glyphs: dict[int, np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Every glyph at every offset in the 8x8 frame, three noisy copies each."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for digit, glyph in sorted(glyphs.items()):
        h, w = glyph.shape
        for dy in range(SIDE - h + 1):
            for dx in range(SIDE - w + 1):
                for _ in range(3):
                    image = np.zeros((SIDE, SIDE))
                    image[dy : dy + h, dx : dx + w] = glyph * rng.uniform(10, 16)
                    image += rng.normal(0, 1.5, image.shape)
                    xs.append(np.clip(image, 0, 16).ravel())
                    ys.append(digit)
    return np.array(xs) / 16.0, np.array(ys)


class DigitClassifier(Model):
    input_model = DigitImage

    def load(self, device: str) -> None:
        super().load(device)
        assert self.model_dir is not None  # the loader passes the model's directory
        x, y = training_set(read_glyphs(self.model_dir / "digits.txt"))
        x = np.hstack([x, np.ones((len(x), 1))])
        onehot = np.eye(10)[y]
        self.weights = np.zeros((x.shape[1], 10))
        for _ in range(300):  # full-batch gradient descent on the cross-entropy
            p = _softmax(x @ self.weights)
            self.weights -= 2.0 * x.T @ (p - onehot) / len(x)
        accuracy = float((np.argmax(x @ self.weights, axis=1) == y).mean())
        if accuracy < 0.95:  # a broken digits.txt must not serve a coin toss
            raise RuntimeError(f"training accuracy {accuracy:.2f} < 0.95: check digits.txt")

    def predict(self, inputs: list[Any]) -> list[Any]:
        outputs: list[Any] = [None] * len(inputs)
        rows, where = [], []
        for i, item in enumerate(inputs):
            image = np.asarray(self.parse(item).pixels, dtype=float)
            if image.shape != (SIDE, SIDE):
                outputs[i] = ItemError("invalid_input", f"pixels must be 8x8, got {image.shape}")
                continue
            rows.append(np.append(np.clip(image, 0, 16).ravel() / 16.0, 1.0))
            where.append(i)
        if rows:
            probabilities = _softmax(np.array(rows) @ self.weights)
            for i, p in zip(where, probabilities, strict=True):
                outputs[i] = {
                    "digit": int(np.argmax(p)),
                    "probabilities": [round(float(v), 4) for v in p],
                }
        return outputs


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
