"""``DigitsRunner``: the built-in demo model, a tiny class-conditional diffusion model that
draws an 8x8 handwritten digit named in a prompt and returns it as PNG and pixels.

The forward pass runs with numpy on CPU and with torch on CUDA, through one small array shim,
so serving on CPU needs no torch. Each item's starting noise comes from its own seed, so an
item's output does not depend on the batch it was sampled in. Weights come from
``scripts/train_demo.py``.
"""

from __future__ import annotations

import base64
import re
import secrets
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.numpy import load_file

from gpufleet.models.runtime import Batching, ItemError, ModelInfo, release_cuda_cache

WEIGHTS_FILE = "digits.safetensors"
DEFAULT_DIR = Path(__file__).parent

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Whole numbers and English digit words; "7th" or "someone" name no digit.
_DIGIT_TOKEN = re.compile(r"\b(\d+|" + "|".join(_WORDS) + r")\b", re.IGNORECASE)

Array = Any  # numpy.ndarray on CPU, torch.Tensor on CUDA: both support @, +, *, [] and clip


class DigitsInput(BaseModel):
    """One input. Strict: "20" is not a number and unknown fields are refused, so a typo
    ("step") fails its item instead of being ignored."""

    model_config = ConfigDict(strict=True, extra="forbid", title="digits input")

    prompt: str = Field(
        description='Names exactly one digit, as a numeral or an English word: "a handwritten 7".',
        max_length=1000,
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Same seed, same image; drawn when omitted."
    )
    steps: int = Field(20, ge=1, le=100, description="Sampling steps: fewer is faster.")
    guidance: float = Field(
        3.0, ge=0, le=10, description="Classifier-free guidance: 0 ignores the prompt."
    )
    scale: int = Field(8, ge=1, le=32, description="PNG upscaling factor (8 gives 64x64).")


@dataclass(frozen=True)
class _Backend:
    """The few operations that differ between numpy and torch; the rest is shared syntax."""

    to_device: Callable[[np.ndarray], Array]
    to_numpy: Callable[[Array], np.ndarray]
    silu: Callable[[Array], Array]
    float_dtype: type[np.floating[Any]]


def _numpy_silu(x: np.ndarray) -> np.ndarray:
    # sigmoid through tanh: no overflow warning for large negative inputs, unlike 1/(1+exp(-x))
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))


# float64 on CPU: BLAS may sum a row in another order when the batch has another size, and
# in float32 that flips a rounded pixel now and then; in float64 it stays far below 1/255.
_NUMPY = _Backend(
    to_device=lambda a: a, to_numpy=lambda a: a, silu=_numpy_silu, float_dtype=np.float64
)


def _torch_backend(device: str) -> _Backend:
    import torch  # only CUDA serving needs torch

    return _Backend(
        to_device=lambda a: torch.as_tensor(a).to(device),
        to_numpy=lambda t: t.cpu().numpy(),
        silu=torch.nn.functional.silu,
        float_dtype=np.float32,
    )


class DigitsRunner:
    """Draws a handwritten digit 0-9 named in the prompt (8x8, upscaled PNG)."""

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self.weights_path = Path(model_dir or DEFAULT_DIR) / WEIGHTS_FILE
        self.info = ModelInfo(
            name="digits",
            version="1",
            description=(
                "Tiny class-conditional diffusion model: draws an 8x8 handwritten digit "
                "named in the prompt, as PNG and pixels (white ink on black)."
            ),
            input_schema=DigitsInput.model_json_schema(),
            example_input={"prompt": "a handwritten 7", "seed": 42, "steps": 20},
        )
        self.batching = Batching(max_batch_size=32, max_queue_delay_ms=5)
        self._device: str | None = None
        self._backend = _NUMPY
        self._params: dict[str, Array] = {}
        self._blocks = 0
        self._alphas_cumprod = np.ones(0)
        self._null_class = 0

    def load(self, device: str) -> None:
        tensors = load_file(self.weights_path)
        with safe_open(self.weights_path, framework="numpy") as f:
            metadata = f.metadata() or {}
        self._null_class = int(metadata["null_class"])
        self._alphas_cumprod = tensors["alphas_cumprod"].astype(np.float64)
        # Fold the timestep and class embeddings through the first layer once: each step then
        # costs one row lookup instead of a concatenation and a wider matrix product.
        params = {
            "w_x": tensors["input.weight_x"],
            "t_proj": tensors["time_embedding"] @ tensors["input.weight_t"] + tensors["input.bias"],
            "c_proj": tensors["class_embedding"] @ tensors["input.weight_c"],
            "w_out": tensors["output.weight"],
            "b_out": tensors["output.bias"],
        }
        self._blocks = sum(1 for name in tensors if re.fullmatch(r"blocks\.\d+\.weight", name))
        for i in range(self._blocks):
            params[f"w{i}"] = tensors[f"blocks.{i}.weight"]
            params[f"b{i}"] = tensors[f"blocks.{i}.bias"]
        self._backend = _torch_backend(device) if device.startswith("cuda") else _NUMPY
        self._params = {
            k: self._backend.to_device(np.ascontiguousarray(v, dtype=self._backend.float_dtype))
            for k, v in params.items()
        }
        self._device = device

    def warmup(self) -> None:
        self.predict([{"prompt": str(d), "seed": d, "steps": 4} for d in range(4)])

    def unload(self) -> None:
        self._params = {}
        release_cuda_cache(self._device)
        self._device = None

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._device is None:
            raise RuntimeError("DigitsRunner.predict called before load()")
        outputs: list[Any] = [None] * len(inputs)
        valid: list[tuple[int, DigitsInput, int, int]] = []  # (index, input, digit, seed)
        for i, raw in enumerate(inputs):
            parsed = _parse_input(raw)
            if isinstance(parsed, ItemError):
                outputs[i] = parsed
            else:
                item, digit = parsed
                seed = item.seed if item.seed is not None else secrets.randbelow(2**32)
                valid.append((i, item, digit, seed))
        # Items with the same step count share one forward per step; other counts run apart.
        for steps in sorted({item.steps for _, item, _, _ in valid}):
            group = [v for v in valid if v[1].steps == steps]
            images = self._sample(
                digits=[d for _, _, d, _ in group],
                seeds=[s for _, _, _, s in group],
                guidance=[item.guidance for _, item, _, _ in group],
                steps=steps,
            )
            for (i, item, digit, seed), image in zip(group, images, strict=True):
                outputs[i] = _render(image, digit=digit, seed=seed, steps=steps, scale=item.scale)
        return outputs

    def _sample(
        self, digits: list[int], seeds: list[int], guidance: list[float], steps: int
    ) -> np.ndarray:
        """DDIM (eta = 0) over ``steps`` evenly strided timesteps, with classifier-free
        guidance: the conditional and unconditional passes share one forward of 2B rows."""
        be, p, n = self._backend, self._params, len(digits)
        noise = np.stack([np.random.default_rng(s).standard_normal(64) for s in seeds])
        x = be.to_device(noise.astype(be.float_dtype))
        labels = be.to_device(np.array(digits + [self._null_class] * n, dtype=np.int64))
        both = be.to_device(np.concatenate([np.arange(n), np.arange(n)]))
        w = be.to_device(np.array(guidance, dtype=be.float_dtype)[:, None])
        class_h = p["c_proj"][labels]
        abar = self._alphas_cumprod
        timesteps = np.linspace(len(abar) - 1, 0, steps).round().astype(int)
        for k, t in enumerate(timesteps):
            h = be.silu((x @ p["w_x"])[both] + p["t_proj"][int(t)] + class_h)
            for i in range(self._blocks):
                h = h + be.silu(h @ p[f"w{i}"] + p[f"b{i}"])
            eps_both = h @ p["w_out"] + p["b_out"]
            eps = eps_both[n:] + w * (eps_both[:n] - eps_both[n:])
            a = float(abar[t])
            x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clip(-1.0, 1.0)
            if k + 1 < steps:
                # The noise that the clipped x0 implies: stepping with the raw prediction instead
                # lets x drift away from [-1, 1] over many steps until it overflows.
                eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
                a_prev = float(abar[timesteps[k + 1]])
                x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            else:
                x = x0
        return be.to_numpy(x).reshape(n, 8, 8)


def _parse_input(raw: Any) -> tuple[DigitsInput, int] | ItemError:
    """Validate one input and find the digit its prompt names."""
    if not isinstance(raw, dict):
        return ItemError("invalid_input", f"input must be a JSON object, got {type(raw).__name__}")
    try:
        item = DigitsInput.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        )
        return ItemError("invalid_input", problems)
    tokens = [m.lower() for m in _DIGIT_TOKEN.findall(item.prompt)]
    named = {int(tok) if tok.isdigit() else _WORDS.index(tok) for tok in tokens}
    if len(named) != 1 or not all(tok in _WORDS or len(tok) == 1 for tok in tokens):
        found = ", ".join(tokens) if tokens else "none"
        return ItemError(
            "invalid_prompt",
            f"prompt must name exactly one digit 0-9, as a numeral or a word "
            f'("a handwritten 7", "seven"); found {found} in {item.prompt!r}',
        )
    return item, named.pop()


def _render(image: np.ndarray, *, digit: int, seed: int, steps: int, scale: int) -> dict[str, Any]:
    pixels = np.rint((image + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    big = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    return {
        "digit": digit,
        "width": big.shape[1],
        "height": big.shape[0],
        "png_base64": base64.b64encode(encode_png(big)).decode("ascii"),
        "pixels": pixels.tolist(),
        "seed": seed,
        "steps": steps,
    }


def encode_png(gray: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a 2-D uint8 array (filter type 0 on every row)."""
    height, width = gray.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # a leading 0 byte per row: no filter
    rows[:, 1:] = gray

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
