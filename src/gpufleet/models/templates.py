"""``models init``: a new model directory that serves as it is, one per format, with every
``model.yaml`` field and runner method explained in comments.

The ``torchscript``, ``onnx`` and ``hf`` templates hold a real, tiny model built here from a
fixed seed (a scripted torch module, an ONNX graph, a two-layer BERT classifier), so
``validate`` and ``serve`` work on them before the user brings their own. The libraries are
imported only for those templates; when one is missing, ``InvalidInput`` names the extra.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpufleet.errors import Conflict, InvalidInput
from gpufleet.models.manifest import NAME_PATTERN

TEMPLATES = ("python", "torchscript", "onnx", "hf")

# What each template imports to be written and served, and the extra that installs it.
_NEEDS = {
    "torchscript": (("torch",), "torch"),
    "onnx": (("onnx", "onnxruntime"), "onnx"),
    "hf": (("torch", "transformers", "tokenizers"), "hf"),
}

_HEADER = """\
# {name}: a gpufleet model directory. `gpufleet models validate {dir}` builds, loads
# and tries it; `gpufleet serve --model {dir}` serves it. Each field is explained.
model:
  # What tasks name: {{"model": "{name}", "input": ...}}.
  name: {name}
  # Quote it (YAML reads 1.10 as the number 1.1). A packaged version is immutable.
  version: "0.1.0"
  # python (your class) | torchscript | onnx | hf (a transformers directory)
  format: {format}
"""

_FOOTER = """\
  # Up to max_batch_size inputs reach predict together; a partial batch waits at most
  # max_queue_delay_ms for more, and only while requests arrive together.
  batching: {{max_batch_size: 8, max_queue_delay_ms: 5}}
  # How a worker takes a GPU. A model asks for a whole GPU (mode: whole) unless told; this
  # one runs on CPU. Others: {{mode: whole, count: 2}}, {{mode: fraction, memory_gb: 8,
  # compute_percent: 50}} (limits the worker enforces) or mode: mps (the driver does).
  resources:
    gpu: {{mode: none}}
  # fp32 | fp16 | bf16 | fp8 (hf only), applied by the loader; GPUs are checked against it.
  precision: fp32
"""

_PYTHON_YAML = """\
  # The class to serve: python:FILE.py:CLASS (FILE relative to this directory) or
  # python:package.module:CLASS.
  runtime: "python:runner.py:{cls}"
  description: "Counts the words of a text and shouts it back."
  # One input that works as is: GET /v1/models publishes it, `models validate` runs it.
  example_input: {{text: "hello world"}}
  # The input schema (JSON Schema, checked at submit) comes from the class's input_model.
  # Or write it here, which wins over the code's:
  # input_schema: {{type: object, required: [text], properties: {{text: {{type: string}}}}}}
"""

_RUNNER = '''\
"""The {name} model: what gpufleet calls, and when."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from gpufleet import ItemError, Model


class {cls}Input(BaseModel):
    """One input. Its JSON Schema is published by GET /v1/models and checked at submit."""

    text: str = Field(max_length=10_000, description="Any text.")


class {cls}(Model):
    # Name, version, batching and the example come from model.yaml, not from here.
    input_model = {cls}Input

    # __init__(self, model_dir) is inherited: self.model_dir is this directory (where your
    # weights are). Override it to take the directory, or nothing; build nothing heavy
    # there: the API process builds the class too, to read what it publishes.

    def load(self, device: str) -> None:
        """Once per worker, before any batch: read weights and move them to ``device``
        ("cpu" or "cuda:N")."""
        super().load(device)  # sets self.device
        self.shout = str.upper  # stands for your weights

    def warmup(self) -> None:
        """Once after load: compile kernels, fill caches (optional)."""
        self.predict([{{"text": "warm up"}}])

    def predict(self, inputs: list[Any]) -> list[Any]:
        """A batch of inputs (decoded JSON) in; one output per input out, in order: a JSON
        value, or ItemError for an input that fails alone (the rest of the batch still
        succeeds). An exception fails the whole batch (retried one by one once)."""
        outputs: list[Any] = []
        for item in inputs:
            text = self.parse(item).text  # a {cls}Input
            if not text.strip():
                outputs.append(ItemError("invalid_input", "text is empty"))
                continue
            outputs.append({{"words": len(text.split()), "shouted": self.shout(text)}})
        return outputs

    # def unload(self) -> None:  # optional: free device memory before the worker exits
'''

_TORCHSCRIPT_YAML = """\
  # The TorchScript archive (torch.jit.script(module).save(...)), relative to here.
  entry: model.pt
  description: "4 numbers in, 3 out: a tiny scripted Linear-tanh-Linear module."
  # One input (no batch dimension): a nested list of numbers. Whole numbers in the example
  # make that input int64; here they are floats.
  example_input: [0.5, -1.0, 2.0, 0.25]
"""

_ONNX_YAML = """\
  # The ONNX graph, relative to here; inputs and outputs are named and typed by it.
  entry: model.onnx
  description: "y = x @ W + b for x of 4 numbers: a tiny ONNX graph."
  # One input (no batch dimension); the schema comes from the graph's declared inputs.
  example_input: [0.5, -1.0, 2.0, 0.25]
"""

_HF_YAML = """\
  # A transformers model directory (config.json, weights, tokenizer); entry: SUBDIR if it
  # is not this directory itself.
  # text-generation | text-classification | feature-extraction
  task: text-classification
  description: "A tiny two-layer BERT sentiment classifier with random weights."
  example_input: {text: "a good movie with a great story"}
"""


def write_template(name: str, template: str, target: Path) -> list[str]:
    """Write the ``template`` model called ``name`` into ``target`` (created; it must not
    exist or be empty); the files written, relative to it. Nothing is left on a failure."""
    if template not in TEMPLATES:
        raise InvalidInput(
            f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}", field="template"
        )
    if not re.match(NAME_PATTERN, name):
        raise InvalidInput(
            f"{name!r} is not a model name: lower-case letters, digits, '.', '_' and '-', "
            "up to 64, starting with a letter or digit",
            field="name",
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise Conflict(f"{target} already exists and is not empty; choose another --dir")
    modules, extra = _NEEDS.get(template, ((), ""))
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise InvalidInput(
            f"the {template} template needs {', '.join(missing)}: pip install "
            f"'gpufleet[{extra}]' (from a checkout: pip install -e '.[{extra}]')",
            field="template",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        yaml_body = _HEADER.format(name=name, dir=target, format=template)
        yaml_body += _BODIES[template](staging, name) + _FOOTER.format()
        (staging / "model.yaml").write_text(yaml_body)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        if target.exists():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files


def _python(path: Path, name: str) -> str:
    cls = "".join(part.capitalize() for part in re.split(r"[^a-z0-9]+", name) if part) or "M"
    cls = cls if cls[0].isalpha() else f"Model{cls}"
    (path / "runner.py").write_text(_RUNNER.format(name=name, cls=cls))
    return _PYTHON_YAML.format(cls=cls)


def _torchscript(path: Path, name: str) -> str:
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(4, 16)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y: torch.Tensor = self.out(torch.tanh(self.hidden(x)))
            return y

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.script; its loader still reads it
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(Tiny().eval())  # type: ignore[no-untyped-call, unused-ignore]
    scripted.save(str(path / "model.pt"))  # type: ignore[no-untyped-call, unused-ignore]
    return _TORCHSCRIPT_YAML


def _onnx(path: Path, name: str) -> str:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime of the last years
    onnx.checker.check_model(model)
    onnx.save(model, str(path / "model.onnx"))
    return _ONNX_YAML


_WORDS = ["a", "the", "good", "great", "fine", "bad", "dull", "poor", "movie", "story", "and"]
# The tokenizer's special tokens by role (BERT's), first in the vocabulary.
_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}


def _hf(path: Path, name: str) -> str:
    vocab_size = save_word_level_tokenizer(path, _WORDS)
    tiny_bert_classifier(vocab_size).save_pretrained(str(path))
    return _HF_YAML


def save_word_level_tokenizer(path: Path, words: list[str]) -> int:
    """A BERT-style word-level tokenizer (``[CLS] text [SEP]``, lower-cased) over ``words``,
    saved in ``path``; returns its vocabulary's size."""
    # As Any: these libraries' annotations vary between their versions.
    tok: Any = importlib.import_module("tokenizers")
    hf: Any = importlib.import_module("transformers")
    vocab = {token: i for i, token in enumerate([*_SPECIALS.values(), *words])}
    core = tok.Tokenizer(tok.models.WordLevel(vocab=vocab, unk_token=_SPECIALS["unk_token"]))
    core.normalizer = tok.normalizers.Lowercase()
    core.pre_tokenizer = tok.pre_tokenizers.Whitespace()
    core.post_processor = tok.processors.BertProcessing(
        (_SPECIALS["sep_token"], vocab[_SPECIALS["sep_token"]]),
        (_SPECIALS["cls_token"], vocab[_SPECIALS["cls_token"]]),
    )
    hf.PreTrainedTokenizerFast(tokenizer_object=core, **_SPECIALS).save_pretrained(str(path))
    return len(vocab)


def tiny_bert_classifier(vocab_size: int) -> Any:
    """A 2-layer BERT sequence classifier (labels ``negative`` / ``positive``), seeded."""
    torch: Any = importlib.import_module("torch")
    hf: Any = importlib.import_module("transformers")
    hf.utils.logging.disable_progress_bar()  # "Writing model shards" on a 100 kB model
    config = hf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    return hf.BertForSequenceClassification(config)


_BODIES: dict[str, Callable[[Path, str], str]] = {
    "python": _python,
    "torchscript": _torchscript,
    "onnx": _onnx,
    "hf": _hf,
}
