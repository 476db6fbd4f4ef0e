"""Tiny real models in a temp dir, one per loader format, each with its ``model.yaml``.

Each ``make_*_dir(path)`` writes a complete model directory under ``path`` (created if needed)
and returns it: weights built from a fixed seed (so two calls give the same model), saved the
way the format's own tools save them, nothing downloaded. Tests for directories, the registry
and the worker reuse them. Import this module only where torch / onnx / transformers exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from gpufleet.models.templates import save_word_level_tokenizer, tiny_bert_classifier

# Sentences to train the tiny tokenizers on: every word a test prompt uses is in here.
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model for tests",
    "a good movie with a great story and fine actors",
    "a bad movie with a dull story and poor acting",
    "gpus serve big models to many users at once",
    "once upon a time there was a small language model",
]

TORCHSCRIPT_EXAMPLE = [0.5, -1.0, 2.0, 0.25]


class TinyNet(torch.nn.Module):
    """4 features in, 3 out: Linear, tanh, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


class PairNet(torch.nn.Module):
    """Two named inputs (``features`` float [4], ``ids`` int [2]), two outputs (a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 2)

    def forward(
        self, features: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = features + self.embed(ids).sum(dim=1)
        return self.proj(mixed), mixed.sum(dim=1)


def write_model_yaml(model_dir: Path, **fields: Any) -> None:
    """``model.yaml`` with ``model: {name, version: "1.0.0", **fields}`` (JSON is YAML)."""
    model = {"name": model_dir.name, "version": "1.0.0", **fields}
    (model_dir / "model.yaml").write_text(json.dumps({"model": model}, indent=2) + "\n")


def make_torchscript_dir(path: Path, *, precision: str = "fp32", pair: bool = False) -> Path:
    """``model.pt``: ``TinyNet`` (one input of 4 floats), or ``PairNet`` when ``pair``."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = PairNet() if pair else TinyNet()
    torch.jit.script(module.eval()).save(str(path / "model.pt"))
    example: Any = (
        {"inputs": {"features": [1.0, 0.0, -1.0, 0.5], "ids": [1, 2]}}
        if pair
        else TORCHSCRIPT_EXAMPLE
    )
    write_model_yaml(
        path, format="torchscript", precision=precision, entry="model.pt", example_input=example
    )
    return path


def make_onnx_dir(
    path: Path, *, precision: str = "fp32", pair: bool = False, batch_dim: int | str = "batch"
) -> Path:
    """``model.onnx``: ``y = x @ W + b`` for ``x`` [batch, 4] (float32 or float16 throughout);
    ``batch_dim`` fixes the first dimension to a size instead.

    With ``pair``: inputs ``x`` float [batch, 4] and ``k`` int64 [batch], outputs ``y`` =
    ``x @ W + b`` and ``scaled`` = ``x * k`` (per row): named inputs and outputs, mixed dtypes.
    """
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"fp32": np.float32, "fp16": np.float16}[precision]
    onnx_type = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[precision]
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np_dtype), "W")
    bias = numpy_helper.from_array(rng.standard_normal(3).astype(np_dtype), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", onnx_type, [batch_dim, 4])]
    outputs = [helper.make_tensor_value_info("y", onnx_type, [batch_dim, 3])]
    if pair:
        axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
        nodes += [
            helper.make_node("Cast", ["k"], ["k_float"], to=onnx_type),
            helper.make_node("Unsqueeze", ["k_float", "axes"], ["k_col"]),
            helper.make_node("Mul", ["x", "k_col"], ["scaled"]),
        ]
        inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [batch_dim]))
        outputs.append(helper.make_tensor_value_info("scaled", onnx_type, [batch_dim, 4]))
        initializers = [weight, bias, axes]
    else:
        initializers = [weight, bias]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    onnx.save(model, str(path / "model.onnx"))
    write_model_yaml(path, format="onnx", precision=precision, entry="model.onnx")
    return path


def _byte_level_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``CORPUS``, saved to ``path``;
    returns its vocabulary size. ``<|endoftext|>`` is bos, eos and unk; there is no pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(str(path))
    return len(tokenizer)


def _sharpen(model: torch.nn.Module) -> None:
    """Weights wider than transformers' init (std 0.02): outputs then differ clearly between
    texts, and greedy choices have clear winners that survive fp16 / bf16 rounding."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)


def make_hf_causal_lm_dir(path: Path, *, precision: str = "fp32") -> Path:
    """A 2-layer GPT-2 (32 wide, context 64) with random weights and a byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _byte_level_tokenizer(path)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    _sharpen(model)
    model.save_pretrained(str(path))
    write_model_yaml(path, format="hf", precision=precision)
    return path


def make_hf_classifier_dir(path: Path, *, precision: str = "fp32") -> Path:
    """A 2-layer BERT sequence classifier (labels ``negative`` / ``positive``): the
    ``models init --template hf`` model, over ``CORPUS``'s words, with sharpened weights."""
    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in CORPUS for w in line.replace(",", " , ").split()})
    model = tiny_bert_classifier(save_word_level_tokenizer(path, words))
    _sharpen(model)
    model.save_pretrained(str(path))
    write_model_yaml(path, format="hf", precision=precision)
    return path


def runner_from_dir(model_dir: Path, **overrides: Any) -> Any:
    """``create_runner`` with the fields of ``model_dir/model.yaml`` (``overrides`` win): what
    ``load_model_dir`` does for these formats, without its other checks."""
    import yaml

    from gpufleet.models.formats import create_runner

    model = yaml.safe_load((model_dir / "model.yaml").read_text())["model"]
    fields: dict[str, Any] = {
        "format": model["format"],
        "name": model["name"],
        "version": model["version"],
        "description": model.get("description", ""),
        "precision": model["precision"],
        "entry": model.get("entry"),
        "task": model.get("task"),
        "batching": None,
        "example_input": model.get("example_input"),
    }
    fields.update(overrides)
    return create_runner(model_dir, **fields)
