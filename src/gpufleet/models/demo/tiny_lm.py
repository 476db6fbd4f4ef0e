"""``tiny-lm``: the second demo model, a small decoder-only transformer in plain torch with a
byte-level tokenizer (no tokenizer files), random weights of any size, and a KV cache.

It exists to exercise the platform with an LLM-shaped workload (weights loading, batched
generation, token rates): its weights are random, so its text is gibberish. ``python -m
gpufleet.models.demo.tiny_lm generate DIR --params 1e9`` writes a model directory of any size.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufleet.errors import InvalidInput
from gpufleet.models.runtime import Batching, ItemError, ModelInfo, release_cuda_cache
from gpufleet.models.weights import TensorSpec, load_safetensors, write_safetensors

if TYPE_CHECKING:
    import torch

    from gpufleet.models.demo.transformer import DecodeGraph, Transformer

BOS, EOS = 256, 257  # byte tokens are 0-255; EOS also pads on the left
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
_CODES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
_TORCH = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_AHEAD = 4  # random tensors made ahead of the writer
GRAPH_AFTER_STEPS = 32  # a lone generation this long captures the decode graph
Precision = Literal["fp32", "fp16", "bf16"]


class TinyLMConfig(BaseModel):
    """``config.json``: the model's shape and the precision it is stored and run in."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    vocab: int = Field(258, ge=258, le=1 << 20)
    d_model: int = Field(256, ge=8, le=65536)
    n_layers: int = Field(4, ge=1, le=1024)
    n_heads: int = Field(4, ge=1, le=1024)
    d_ff: int = Field(1024, ge=1, le=1 << 20)
    max_seq: int = Field(512, ge=16, le=1 << 20)
    dtype: Precision = "fp32"

    def tensor_specs(self) -> list[TensorSpec]:
        d, code = self.d_model, _CODES[self.dtype]
        specs = [TensorSpec("embed.weight", code, (self.vocab, d))]
        for i in range(self.n_layers):
            specs += [
                TensorSpec(f"layers.{i}.attn_norm.weight", code, (d,)),
                TensorSpec(f"layers.{i}.attn.qkv.weight", code, (3 * d, d)),
                TensorSpec(f"layers.{i}.attn.out.weight", code, (d, d)),
                TensorSpec(f"layers.{i}.mlp_norm.weight", code, (d,)),
                TensorSpec(f"layers.{i}.mlp.up.weight", code, (self.d_ff, d)),
                TensorSpec(f"layers.{i}.mlp.down.weight", code, (d, self.d_ff)),
            ]
        return [
            *specs,
            TensorSpec("norm.weight", code, (d,)),
            TensorSpec("lm_head.weight", code, (self.vocab, d)),
        ]

    def param_count(self) -> int:
        return sum(math.prod(s.shape) for s in self.tensor_specs())

    @classmethod
    def for_params(
        cls, params: float, dtype: Precision = "bf16", max_seq: int = 2048
    ) -> TinyLMConfig:
        """A GPT-like shape (d_ff = 4 d_model, 64- or 128-wide heads) of about ``params``."""
        d = max(128, 128 * round(2.05 * params ** (1 / 3) / 128))
        head = 64 if d <= 1024 else 128
        layers = max(1, round((params - 2 * 258 * d) / (12 * d * d + 2 * d)))
        return cls(
            d_model=d, n_layers=layers, n_heads=d // head, d_ff=4 * d, max_seq=max_seq, dtype=dtype
        )


def random_tensors(config: TinyLMConfig, seed: int) -> Iterator[torch.Tensor]:
    """The weights of a random model, in ``tensor_specs`` order; each comes from its own seeded
    generator, so the same seed gives the same bytes whatever the thread count."""
    import torch

    specs = config.tensor_specs()

    def make(index: int) -> torch.Tensor:
        spec = specs[index]
        dtype = getattr(torch, _TORCH[config.dtype])
        if spec.name.endswith("norm.weight"):
            return torch.ones(spec.shape, dtype=dtype)
        # Uniform with the variance of N(0, 1/fan_in): as good as normal for noise, and faster.
        bound = math.sqrt(3.0) * (1.0 if spec.name == "embed.weight" else spec.shape[1] ** -0.5)
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        return torch.empty(spec.shape).uniform_(-bound, bound, generator=g).to(dtype)

    # A few tensors are made ahead of the writer, in threads (torch frees the GIL while it
    # fills them); never all at once: a 10 GB model must not need 10 GB of memory.
    with ThreadPoolExecutor(_AHEAD) as pool:
        ahead: deque[Future[torch.Tensor]] = deque()
        for index in range(len(specs)):
            ahead.append(pool.submit(make, index))
            if len(ahead) > _AHEAD:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


class TinyLMInput(BaseModel):
    """One input. Strict: unknown fields and wrong types fail the item, not the batch."""

    model_config = ConfigDict(strict=True, extra="forbid", title="tiny-lm input")

    prompt: str = Field(
        description="Text to continue (UTF-8 bytes are the tokens).", max_length=100_000
    )
    max_new_tokens: int = Field(32, ge=1, le=512, description="Tokens (bytes) to generate at most.")
    temperature: float = Field(
        0.0, ge=0, le=5, description="0 picks the likeliest token; above samples."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Same seed, same text; drawn when omitted."
    )


class TinyLM:
    """Continues a prompt byte by byte. Random weights: for performance work only."""

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.config = self._read_config() if self.model_dir else TinyLMConfig()
        self.info = ModelInfo(
            name="tiny-lm",
            version="1.0.0",
            description=(
                "Small decoder-only transformer with byte tokens and RANDOM weights "
                f"({self.config.param_count() / 1e6:,.1f}M parameters, {self.config.dtype}): "
                "an LLM-shaped workload for performance work; its text is gibberish."
            ),
            input_schema=TinyLMInput.model_json_schema(),
            example_input={"prompt": "Once upon a time", "max_new_tokens": 16, "seed": 1},
        )
        self.batching = Batching(max_batch_size=16, max_queue_delay_ms=10)
        self.device: str | None = None
        self._net: Transformer | None = None
        self._graph: DecodeGraph | None = None  # see _decode_graph
        self._graph_tried = False

    def _read_config(self) -> TinyLMConfig:
        assert self.model_dir is not None
        path = self.model_dir / CONFIG_FILE
        try:
            return TinyLMConfig.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError included
            raise InvalidInput(
                f"{path}: not a valid tiny-lm config: {exc}", path=str(path)
            ) from exc

    def load(self, device: str) -> None:
        import torch

        from gpufleet.models.demo.transformer import Transformer

        dtype = getattr(torch, _TORCH[self.config.dtype])
        if torch.device(device).type == "cpu" and dtype == torch.float16:
            dtype = torch.float32  # CPU half matmuls are slow and not always there: fp32 or bf16
        if self.model_dir is None:
            specs = self.config.tensor_specs()
            weights = {
                s.name: t.to(device, dtype)
                for s, t in zip(specs, random_tensors(self.config, 0), strict=True)
            }
        else:
            weights = load_safetensors(self.model_dir / WEIGHTS_FILE, device, dtype=dtype)
            missing = {s.name for s in self.config.tensor_specs()} - set(weights)
            if missing:
                raise InvalidInput(
                    f"{self.model_dir / WEIGHTS_FILE}: missing tensors {sorted(missing)[:5]}"
                )
        self._net = Transformer(self.config, weights)
        self.device = device

    def warmup(self) -> None:
        # The kernels of a lone sequence and of a padded batch, prompt and decode step: their
        # first run pays for the model's shapes (cuBLAS choices, lazily loaded kernels).
        self.predict([{"prompt": "warm up", "max_new_tokens": 2}])
        self.predict(
            [{"prompt": "warm up", "max_new_tokens": 2}, {"prompt": "hi", "max_new_tokens": 1}]
        )

    def unload(self) -> None:
        self._net, self._graph, self._graph_tried = None, None, False
        release_cuda_cache(self.device)
        self.device = None

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._net is None:
            raise RuntimeError("TinyLM.predict called before load()")
        outputs: list[Any] = [None] * len(inputs)
        valid: list[tuple[int, TinyLMInput, int]] = []  # (index, input, seed)
        for i, raw in enumerate(inputs):
            parsed = self._parse(raw)
            if isinstance(parsed, ItemError):
                outputs[i] = parsed
            else:
                valid.append(
                    (
                        i,
                        parsed,
                        parsed.seed if parsed.seed is not None else secrets.randbelow(2**63),
                    )
                )
        if valid:
            t0 = time.perf_counter()
            generated = self.generate(
                [item for _, item, _ in valid], [seed for _, _, seed in valid]
            )
            seconds = max(time.perf_counter() - t0, 1e-9)
            for (i, _, _), tokens in zip(valid, generated, strict=True):
                text = bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
                outputs[i] = {
                    "text": text,
                    "tokens": len(tokens),
                    "tokens_per_s": len(tokens) / seconds,
                }
        return outputs

    def _parse(self, raw: Any) -> TinyLMInput | ItemError:
        if not isinstance(raw, dict):
            return ItemError(
                "invalid_input", f"input must be a JSON object, got {type(raw).__name__}"
            )
        try:
            item = TinyLMInput.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']} (got {e.get('input')!r})"
                for e in exc.errors()
            )
            return ItemError("invalid_input", problems)
        need = len(item.prompt.encode()) + 1 + item.max_new_tokens
        if need > self.config.max_seq:
            return ItemError(
                "invalid_input",
                f"prompt ({len(item.prompt.encode())} bytes) plus max_new_tokens "
                f"({item.max_new_tokens}) exceed the model's context of "
                f"{self.config.max_seq} tokens: shorten the prompt",
            )
        return item

    def generate(self, items: list[TinyLMInput], seeds: list[int]) -> list[list[int]]:
        """The generated tokens of each item (ending at EOS or its ``max_new_tokens``), all
        items in one left-padded batch. Each item samples with its own generator, so its
        tokens do not depend on the batch it was in."""
        import torch

        assert self._net is not None and self.device is not None
        net, dev = self._net, self.device
        prompts = [[BOS, *item.prompt.encode()] for item in items]
        b, p = len(items), max(map(len, prompts))
        steps = max(item.max_new_tokens for item in items)
        unpadded = all(len(prompt) == p for prompt in prompts)  # attention needs no mask
        ids = torch.full((b, p), EOS, dtype=torch.long)
        valid = torch.zeros((b, p + steps), dtype=torch.bool)
        for r, prompt in enumerate(prompts):
            ids[r, p - len(prompt) :] = torch.tensor(prompt)
            valid[r, p - len(prompt) : p] = True
        ids, valid = ids.to(dev), valid.to(dev)
        positions = (valid[:, :p].long().cumsum(1) - 1).clamp(min=0)
        lengths = torch.tensor([len(x) for x in prompts], device=dev)
        gens = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        out: list[list[int]] = [[] for _ in items]
        done = [False] * b
        with torch.inference_mode():
            graph = self._decode_graph(steps) if b == 1 else None  # a lone sequence replays it
            cache = graph.cache if graph is not None else net.new_cache(b, p + steps)
            logits = net.forward(
                ids, positions, valid[:, :p], cache, 0, unpadded=unpadded, last_only=True
            )[:, -1]
            if graph is not None:
                graph.begin(p)
            for step in range(steps):
                chosen = logits.argmax(-1)
                for r, item in enumerate(items):
                    if item.temperature > 0 and not done[r]:
                        probs = torch.softmax(logits[r] / item.temperature, -1)
                        chosen[r] = torch.multinomial(probs, 1, generator=gens[r])[0]
                for r, tok in enumerate(chosen.tolist()):
                    if not done[r]:
                        out[r].append(tok)
                        done[r] = tok == EOS or len(out[r]) >= items[r].max_new_tokens
                if all(done):
                    break
                if graph is not None:
                    logits = graph.run(chosen, p + step)[:, 0]
                    continue
                valid[:, p + step] = True
                logits = net.forward(
                    chosen[:, None],
                    lengths[:, None],
                    valid[:, : p + step + 1],
                    cache,
                    p + step,
                    unpadded=unpadded,
                )[:, 0]
                lengths += 1
        return out

    def _decode_graph(self, steps: int) -> DecodeGraph | None:
        """The CUDA graph of a lone sequence's decode step over the whole context; None where
        the model decodes eagerly. It is captured by the first lone generation of at least
        ``GRAPH_AFTER_STEPS`` tokens: a capture costs about as much as ten eager steps (40-70
        ms for a 1 GB model on an H100), which a short first request must not pay."""
        if not self._graph_tried and steps >= GRAPH_AFTER_STEPS:
            from gpufleet.models.demo.transformer import decode_graph

            assert self._net is not None
            self._graph_tried = True
            self._graph = decode_graph(self._net, self.config.max_seq)
        return self._graph


def generate_model_dir(
    directory: str | Path,
    params: float,
    *,
    dtype: Precision = "bf16",
    seed: int = 0,
    max_seq: int = 2048,
    progress: bool = True,
) -> TinyLMConfig:
    """Write a random tiny-lm model directory of about ``params`` parameters: ``config.json``,
    ``model.safetensors`` (streamed, tensor by tensor), ``model.yaml`` and ``README.md``."""
    import yaml
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    config = TinyLMConfig.for_params(params, dtype, max_seq)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specs = config.tensor_specs()
    total = sum(s.nbytes for s in specs)
    meta = {"format": "pt", "model": "tiny-lm", "seed": str(seed), "weights": "random"}
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
    quiet = not progress or total < 256 * 1024 * 1024
    with Progress("{task.description}", *columns, disable=quiet) as bar:
        task = bar.add_task(f"writing {out / WEIGHTS_FILE}", total=total)
        write_safetensors(
            out / WEIGHTS_FILE,
            specs,
            random_tensors(config, seed),
            metadata=meta,
            on_written=lambda n: bar.advance(task, n),
        )
    (out / CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2) + "\n")
    n = config.param_count()
    description = (
        f"tiny-lm with random weights ({n / 1e6:,.0f}M parameters, {dtype}): "
        "for performance work only, its text is gibberish"
    )
    spec = {
        "model": {
            "name": "tiny-lm",
            "version": "1.0.0",
            "format": "python",
            "runtime": "python:gpufleet.models.demo.tiny_lm:TinyLM",
            "precision": dtype,
            "description": description,
            "files": [{"path": CONFIG_FILE}, {"path": WEIGHTS_FILE}],
        }
    }
    (out / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (out / "README.md").write_text(
        _CARD.format(n=n, gb=total / 1e9, dtype=dtype, seed=seed, c=config)
    )
    return config


_CARD = """# tiny-lm (random weights)

**These weights are random.** This model exists for performance work only (loading, batching,
token rates, memory): it has never been trained and its outputs are gibberish.

- {n:,} parameters, {gb:.2f} GB in {dtype}, generated with seed {seed}
- decoder-only transformer: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads,
  d_ff {c.d_ff}, RMSNorm, rotary positions, GELU MLP; context {c.max_seq} tokens
- byte-level tokenizer: tokens 0-255 are bytes, 256 is BOS, 257 EOS; no tokenizer files
- input `{{"prompt": str, "max_new_tokens": 32, "temperature": 0.0, "seed": null}}`,
  output `{{"text": str, "tokens": int, "tokens_per_s": float}}`
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpufleet.models.demo.tiny_lm")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a random tiny-lm model directory")
    gen.add_argument("directory", type=Path)
    gen.add_argument("--params", type=float, required=True, help="about how many parameters (1e9)")
    gen.add_argument("--dtype", choices=sorted(_CODES), default="bf16")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--max-seq", type=int, default=2048)
    args = parser.parse_args(argv)
    config = generate_model_dir(
        args.directory, args.params, dtype=args.dtype, seed=args.seed, max_seq=args.max_seq
    )
    print(f"wrote {args.directory}: {config.param_count():,} parameters, {config.model_dump()}")


if __name__ == "__main__":
    main()
