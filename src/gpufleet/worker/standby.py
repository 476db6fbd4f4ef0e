"""Standby workers: a process started before any model is given to it.

A fresh worker spends seconds before its first byte of weights: the interpreter, ``import
torch`` (3-5 s on our GPU machine), the CUDA context, cuBLAS and the first kernels. A standby
pays all that ahead, then waits on stdin for its assignment, so when the supervisor needs a
worker (a restart after a crash, a new version) the model's load is bound by reading its
weights. The price is one idle CUDA context per standby (a few hundred MiB of GPU memory;
up to 512 MiB more for a moment while it starts).

It also runs a tiny model of each built-in family end to end (a 2M-parameter tiny-lm in each
half precision, read from a safetensors file through the same loader): the first load and
generate of a model pay for the loader's threads and its copy kernels and for the model's own
kernels, which the generic warm-up above does not reach. Measured on an H100 with a 1 GB
tiny-lm: 0.29-0.43 s from hand-over to first result without it, 0.14-0.19 s with it.

Protocol: the process writes ``standby`` on stdout once the device is ready, then reads one
JSON line ``{"model": SPEC, "worker_id": ID, "lanes": [...], "grace_s": S}``. End of input
(the supervisor stopping) exits 0; a line that is not a valid assignment exits 2 with one
readable line on stderr.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXIT_BAD_ASSIGNMENT = 2


class BadAssignment(ValueError):
    """The line the standby read is not an assignment."""


@dataclass(frozen=True)
class Assignment:
    model: str
    worker_id: str
    lanes: tuple[str, ...]
    grace_s: float

    def to_line(self) -> str:
        body = {
            "model": self.model,
            "worker_id": self.worker_id,
            "lanes": list(self.lanes),
            "grace_s": self.grace_s,
        }
        return json.dumps(body) + "\n"

    @classmethod
    def from_line(cls, line: str) -> Assignment:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadAssignment(f"assignment is not JSON: {exc.msg}") from None
        if not isinstance(data, dict):
            raise BadAssignment("assignment must be a JSON object")
        model, worker_id = data.get("model"), data.get("worker_id")
        lanes, grace_s = data.get("lanes", ["interactive", "batch"]), data.get("grace_s", 30.0)
        if not isinstance(model, str) or not model:
            raise BadAssignment("assignment.model must be a non-empty string")
        if not isinstance(worker_id, str) or not worker_id:
            raise BadAssignment("assignment.worker_id must be a non-empty string")
        if not isinstance(lanes, list) or not all(isinstance(x, str) for x in lanes):
            raise BadAssignment("assignment.lanes must be a list of lane names")
        if not isinstance(grace_s, int | float) or isinstance(grace_s, bool) or grace_s < 0:
            raise BadAssignment("assignment.grace_s must be a number >= 0")
        return cls(model, worker_id, tuple(lanes), float(grace_s))


def prepare_device(device: str) -> float:
    """Pay the start-up costs that do not depend on the model; seconds spent.

    Imports torch when it is installed (a model that needs none loses nothing), and on CUDA
    creates the context, the cuBLAS handle and the kernels every transformer-shaped model
    runs first (matmuls in each float precision, softmax, norms, activations, embedding),
    and pins the host memory that safetensors weights are staged through.
    """
    t0 = time.perf_counter()
    if importlib.util.find_spec("torch") is None:
        return time.perf_counter() - t0
    import torch

    if not device.startswith("cuda"):
        return time.perf_counter() - t0
    dev = torch.device(device)
    torch.cuda.init()  # type: ignore[no-untyped-call]
    torch.cuda.set_device(dev)
    cc = torch.cuda.get_device_capability(dev)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cc >= (8, 0) else [])
    from gpufleet.models.attention import serving_attention

    with torch.inference_mode(), serving_attention():
        ids = torch.arange(8, device=dev).view(1, 8)
        for dtype in dtypes:
            emb = torch.nn.functional.embedding(ids, torch.randn(16, 64, device=dev, dtype=dtype))
            x = emb @ torch.randn(64, 64, device=dev, dtype=dtype)
            x = torch.nn.functional.layer_norm(x, (64,))
            x = torch.nn.functional.gelu(x) + torch.nn.functional.silu(x)
            x = torch.softmax(x.float(), dim=-1).to(dtype)
            torch.bmm(x, x.transpose(1, 2))
            torch.nn.functional.scaled_dot_product_attention(x, x, x)
        warm_large_matmuls(dev, dtypes[1:])  # the half precisions
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()  # the matmuls' operands go back to the GPU
    from gpufleet.models.weights import reserve_staging

    warm_families(device, ["bf16", "fp16"] if cc >= (8, 0) else ["fp16"])
    # Last: a load takes the reserved staging buffer and lets it go, the warm-up's included.
    reserve_staging()  # pinned host memory for the weights' way to the GPU
    return time.perf_counter() - t0


def warm_large_matmuls(dev: torch.device, dtypes: list[torch.dtype]) -> None:
    """Run the matmuls of transformer layers 1024-8192 wide (the projections, as ``linear``
    and as the in-place ``addmm_`` residuals use them; 1-32 rows, as decode steps and short
    prompts give them) in each half precision. cuBLAS picks other kernels for large shapes
    than for the tiny family models below, and CUDA loads each kernel lazily, on its first
    launch; loading them here takes 0.2-0.4 s. Measured on the H100 with a 1 GB tiny-lm:
    the model's first warm-up call 0.018 s instead of 0.028-0.030 s without.

    One weight at a time (at most 512 MiB), none over a quarter of the free memory, and an
    out-of-memory stops it: it is an optimisation, and a capped slot or a full GPU must not
    fail the standby."""
    import torch

    free = torch.cuda.mem_get_info(dev)[0]
    try:
        for dtype in dtypes:
            for d in (1024, 2048, 3072, 4096, 8192):
                for n, k in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d)):
                    if n * k * dtype.itemsize > free // 4:
                        continue
                    w = torch.empty(n, k, device=dev, dtype=dtype)
                    for m in (1, 2, 8, 32):
                        x = torch.empty(m, k, device=dev, dtype=dtype)
                        torch.nn.functional.linear(x, w).addmm_(x, w.t())
                    del w, x
    except torch.cuda.OutOfMemoryError:
        log.info("standby: out of GPU memory warming large matmuls; the rest is skipped")


def warm_families(device: str, dtypes: list[str]) -> None:
    """Load and run a tiny model of each built-in family, from a file, then drop it."""
    import tempfile
    from pathlib import Path

    from gpufleet.models.demo.tiny_lm import GRAPH_AFTER_STEPS, TinyLM, generate_model_dir

    with tempfile.TemporaryDirectory(prefix="gpufleet-standby-") as tmp:
        for dtype in dtypes:
            path = Path(tmp) / dtype
            generate_model_dir(path, 2e6, dtype=dtype, progress=False)  # type: ignore[arg-type]
            runner = TinyLM(path)
            runner.load(device)
            runner.warmup()
            runner.predict([{"prompt": "Hello", "max_new_tokens": 8, "seed": 0}])
            # Long enough to capture the decode graph: the process's first capture costs more.
            runner.predict([{"prompt": "Hello", "max_new_tokens": GRAPH_AFTER_STEPS}])
            runner.unload()


def wait_for_assignment(stdin: IO[str], stdout: IO[str]) -> Assignment | None:
    """Say ``standby``, then block for the assignment (None at end of input)."""
    print("standby", file=stdout, flush=True)
    line = stdin.readline()
    if not line.strip():
        return None
    return Assignment.from_line(line)
