"""Train the built-in ``digits`` demo model: a tiny class-conditional diffusion model (DDPM
training, noise prediction) on scikit-learn's 8x8 handwritten digits, with a null class for
classifier-free guidance. Serving needs neither torch nor scikit-learn: the runner
(``gpufleet.models.demo.runner``) reads the safetensors file this script writes.

How to retrain (a few minutes on two CPU cores)::

    .venv/bin/pip install torch==2.13.0 scikit-learn   # the "train" extra; CPU torch is enough
    .venv/bin/python scripts/train_demo.py --seed 0 --epochs 1500

The file holds the weights laid out for ``x @ W`` (the runner's forward), the noise schedule
(``alphas_cumprod``) and embedding table of the timesteps, the ten class means of the
training images (``centroids``, which the tests use as a nearest-centroid classifier), and the
hyper-parameters as metadata. The same seed gives the same tensors and metadata on the same
torch build (safetensors may order the JSON header differently, so compare contents, not
file hashes).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from sklearn.datasets import load_digits
from torch import nn

DEFAULT_OUT = Path(__file__).parent.parent / "src/gpufleet/models/demo/digits.safetensors"
NUM_STEPS = 100  # diffusion timesteps T
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "no digit" label that classifier-free guidance contrasts with
TIME_DIM = 64
CLASS_DIM = 32
HIDDEN = 256
BLOCKS = 3
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
LABEL_DROPOUT = 0.15  # share of training rows whose label becomes NULL_CLASS
EMA_DECAY = 0.999


def cosine_alphas_cumprod(steps: int, offset: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: noise rises evenly, and step T-1 is pure noise."""
    t = np.arange(steps + 1, dtype=np.float64) / steps
    f = np.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
    return np.cumprod(1 - betas)


def timestep_embedding(steps: int, dim: int) -> np.ndarray:
    """Sinusoidal embedding of each timestep index, shape (steps, dim)."""
    freqs = np.exp(-math.log(1000.0) * np.arange(dim // 2) / (dim // 2))
    angles = np.arange(steps)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


class Denoiser(nn.Module):
    """MLP predicting the noise in x_t from (x_t, embedding of t, embedding of the class).

    The first layer takes the concatenated inputs; residual SiLU blocks follow. The runner
    mirrors exactly this forward in numpy, so a change here must be made there too."""

    def __init__(self, time_table: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("time_table", torch.tensor(time_table, dtype=torch.float32))
        self.class_embedding = nn.Embedding(NUM_CLASSES + 1, CLASS_DIM)
        self.inp = nn.Linear(64 + TIME_DIM + CLASS_DIM, HIDDEN)
        self.blocks = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(BLOCKS))
        self.out = nn.Linear(HIDDEN, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, self.time_table[t], self.class_embedding(label)], dim=1)
        h = nn.functional.silu(self.inp(h))
        for block in self.blocks:
            h = h + nn.functional.silu(block(h))
        return self.out(h)  # type: ignore[no-any-return]


def export(
    model: Denoiser, alphas_cumprod: np.ndarray, centroids: np.ndarray
) -> dict[str, np.ndarray]:
    """Tensors in the runner's layout: weights (in, out), the first layer split by input part."""

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(np.float32)

    w_in = arr(model.inp.weight).T
    tensors = {
        "input.weight_x": np.ascontiguousarray(w_in[:64]),
        "input.weight_t": np.ascontiguousarray(w_in[64 : 64 + TIME_DIM]),
        "input.weight_c": np.ascontiguousarray(w_in[64 + TIME_DIM :]),
        "input.bias": arr(model.inp.bias),
        "class_embedding": arr(model.class_embedding.weight),
        "time_embedding": arr(model.time_table),
        "output.weight": np.ascontiguousarray(arr(model.out.weight).T),
        "output.bias": arr(model.out.bias),
        "alphas_cumprod": alphas_cumprod.astype(np.float64),
        "centroids": centroids.astype(np.float32),
    }
    for i, block in enumerate(model.blocks):
        tensors[f"blocks.{i}.weight"] = np.ascontiguousarray(arr(block.weight).T)
        tensors[f"blocks.{i}.bias"] = arr(block.bias)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    digits = load_digits()
    images = torch.tensor(digits.data / 8.0 - 1.0, dtype=torch.float32)  # 0..16 -> [-1, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    centroids = np.stack([images[labels == k].mean(0).numpy() for k in range(NUM_CLASSES)])

    alphas_cumprod = cosine_alphas_cumprod(NUM_STEPS)
    abar = torch.tensor(alphas_cumprod, dtype=torch.float32)
    model = Denoiser(timestep_embedding(NUM_STEPS, TIME_DIM))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY)
    )
    batches_per_epoch = math.ceil(len(images) / BATCH_SIZE)
    total = args.epochs * batches_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LEARNING_RATE, total_steps=total)

    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(images), generator=gen)
        running = 0.0
        for idx in order.split(BATCH_SIZE):
            x0, y = images[idx], labels[idx].clone()
            y[torch.rand(len(idx), generator=gen) < LABEL_DROPOUT] = NULL_CLASS
            t = torch.randint(0, NUM_STEPS, (len(idx),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = abar[t][:, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            loss = nn.functional.mse_loss(model(xt, t, y), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
            running += loss.item() * len(idx)
        if epoch % 100 == 0 or epoch == args.epochs:
            print(
                f"epoch {epoch}/{args.epochs}  loss {running / len(images):.4f}  "
                f"{time.monotonic() - started:.0f}s",
                flush=True,
            )

    metadata = {
        "model": "digits",
        "num_steps": str(NUM_STEPS),
        "schedule": "cosine",
        "null_class": str(NULL_CLASS),
        "hidden": str(HIDDEN),
        "blocks": str(BLOCKS),
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(export(ema.module, alphas_cumprod, centroids), str(args.out), metadata=metadata)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
