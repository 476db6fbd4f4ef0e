"""``HfRunner``: a transformers model directory (``config.json``, tokenizer, weights) served
for one task: text-generation, text-classification or feature-extraction.

Creating the runner reads ``config.json`` only, to pick and check the task; ``load`` runs the
transformers code path (``AutoTokenizer`` + ``AutoModelFor...from_pretrained`` with
``local_files_only``, never the hub, never remote code) and ``hf_inference`` does the work.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpufleet.models.formats.spec import LoadSpec, torch_dtype
from gpufleet.models.runtime import Batching, ItemError, ModelInfo, release_cuda_cache

if TYPE_CHECKING:
    from gpufleet.models.formats.hf_inference import LoadedModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
MAX_TEXT_CHARS = 100_000


class GenerationInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="text-generation input")

    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="Text to continue.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="At most this many new tokens.")
    temperature: float = Field(
        0.0, ge=0.0, le=5.0, description="0 picks the likeliest token (greedy); higher samples."
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Sampling seed: same seed, same text."
    )


class TextInput(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", title="text input")

    text: str = Field(max_length=MAX_TEXT_CHARS, description="The text (truncated to the context).")


TASK_INPUTS: dict[str, type[BaseModel]] = {
    "text-generation": GenerationInput,
    "text-classification": TextInput,
    "feature-extraction": TextInput,
}
_EXAMPLES: dict[str, dict[str, Any]] = {
    "text-generation": {"prompt": "Once upon a time", "max_new_tokens": 16},
    "text-classification": {"text": "A good movie with a great story."},
    "feature-extraction": {"text": "GPUs serve big models."},
}


class HfRunner:
    """A transformers model and its tokenizer, batched per task."""

    def __init__(self, spec: LoadSpec, *, task: str | None) -> None:
        self.spec = spec
        config = _read_config(spec)
        self.task = _choose_task(spec, config, task)
        for required, patterns in (("tokenizer", TOKENIZER_FILES), ("weight", WEIGHT_PATTERNS)):
            if not any(any(spec.entry.glob(p)) for p in patterns):
                raise spec.invalid(
                    "model.entry",
                    f"{spec.entry_label} has no {required} files ({', '.join(patterns)}); "
                    "save the model and tokenizer there with save_pretrained()",
                )
        schema = TASK_INPUTS[self.task].model_json_schema()
        example = spec.example_input if spec.example_input is not None else _EXAMPLES[self.task]
        self.info: ModelInfo = spec.model_info(schema, example)
        self.batching: Batching = spec.batching
        self.device: str | None = None
        self._loaded: LoadedModel | None = None

    def load(self, device: str) -> None:
        from gpufleet.models.formats import hf_inference

        self._loaded = hf_inference.load(
            self.spec, self.task, device, torch_dtype(self.spec.precision)
        )
        self.device = device

    def warmup(self) -> None:
        item = self.info.example_input
        if self.task == "text-generation" and isinstance(item, dict):
            item = {**item, "max_new_tokens": 4}  # compiles the same kernels, sooner
        self.predict([item, item])

    def unload(self) -> None:
        device, self._loaded, self.device = self.device, None, None
        release_cuda_cache(device)

    @property
    def model(self) -> Any:
        """The loaded ``transformers`` model (None before ``load``)."""
        return None if self._loaded is None else self._loaded.model

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._loaded is None:
            raise RuntimeError("HfRunner.predict called before load()")
        from gpufleet.models.formats import hf_inference

        outputs: list[Any] = [None] * len(inputs)
        valid: dict[int, Any] = {}
        for i, raw in enumerate(inputs):
            parsed = _parse(TASK_INPUTS[self.task], raw)
            if isinstance(parsed, ItemError):
                outputs[i] = parsed
            else:
                valid[i] = parsed
        from gpufleet.models.attention import serving_attention

        with serving_attention():
            done = hf_inference.run_task(self._loaded, self.task, valid)
        for i, output in done.items():
            outputs[i] = output
        return outputs


def _read_config(spec: LoadSpec) -> dict[str, Any]:
    path = spec.entry / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise spec.invalid(
            "model.entry",
            f"no config.json in {spec.entry_label}: format hf needs a directory written by "
            "save_pretrained() (set model.entry to it if it is a subdirectory)",
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise spec.invalid("model.entry", f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise spec.invalid("model.entry", f"{path} must hold a JSON object")
    return config


def _choose_task(spec: LoadSpec, config: dict[str, Any], task: str | None) -> str:
    """The task asked for, or the one ``config.json``'s architectures imply; refused when the
    checkpoint has no head for it (transformers would add a random one)."""
    architectures = [str(a) for a in config.get("architectures") or []]
    is_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if config.get("is_encoder_decoder"):
        raise spec.invalid(
            "model.entry",
            f"{spec.entry_label} is an encoder-decoder model ({', '.join(architectures)}); "
            "format hf serves decoder-only and encoder-only models",
        )
    if task is None:
        if is_lm:
            return "text-generation"
        return "text-classification" if is_classifier else "feature-extraction"
    if task not in TASK_INPUTS:
        raise spec.invalid(
            "model.task", f"unknown task {task!r}; use one of {', '.join(TASK_INPUTS)}"
        )
    needs = {
        "text-generation": (is_lm, "*ForCausalLM or *LMHeadModel"),
        "text-classification": (is_classifier, "*ForSequenceClassification"),
    }
    has_head, wanted = needs.get(task, (True, ""))
    if not has_head:
        raise spec.invalid(
            "model.task",
            f"{task} needs a {wanted} checkpoint, but config.json's architectures are "
            f"{architectures or 'not given'}; save the model with that head or change the task",
        )
    return task


def _parse(model: type[BaseModel], raw: Any) -> BaseModel | ItemError:
    if not isinstance(raw, dict):
        return ItemError("invalid_input", f"input must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']} (got {e.get('input')!r:.60})"
            for e in exc.errors()
        )
        return ItemError("invalid_input", problems)
