"""The torch side of ``HfRunner``: loading a transformers model and tokenizer at a precision,
and running one batch of validated items per task. Imports torch and transformers: only
``HfRunner.load`` and ``HfRunner.predict`` import this module.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
)

from gpufleet.models.formats.fp8 import quantize_fp8_
from gpufleet.models.formats.hf import GenerationInput, TextInput
from gpufleet.models.formats.spec import LoadSpec
from gpufleet.models.runtime import ItemError

logger = logging.getLogger(__name__)

_Item = TypeVar("_Item", bound=BaseModel)

_AUTO_CLASSES: dict[str, Any] = {
    "text-generation": AutoModelForCausalLM,
    "text-classification": AutoModelForSequenceClassification,
    "feature-extraction": AutoModel,
}


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # a transformers PreTrainedModel, in eval mode on ``device``
    tokenizer: Any
    device: torch.device
    context: int  # tokens the model attends to: prompt + new tokens must fit
    eos_ids: frozenset[int]


def load(spec: LoadSpec, task: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """The model on ``device``; fp8 layers are quantized on the CPU first, so the device never
    holds the bf16 weights."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.entry, local_files_only=True)
        model = _AUTO_CLASSES[task].from_pretrained(spec.entry, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise spec.invalid(
            "model.entry", f"transformers cannot load {spec.entry_label}: {exc}"
        ) from exc
    if spec.precision == "fp8":
        output_embeddings = model.get_output_embeddings()
        count = quantize_fp8_(model, skip=[output_embeddings] if output_embeddings else [])
        if count == 0:
            logger.warning("%s: no Linear layer fits fp8 (sizes not multiples of 16)", spec.name)
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise spec.invalid(
                "model.entry",
                f"the tokenizer in {spec.entry_label} has neither a pad nor an eos token, so "
                "items cannot be batched; set pad_token in tokenizer_config.json",
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Generation appends at the right end of each row, so prompts are padded on the left.
    tokenizer.padding_side = "left" if task == "text-generation" else "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # classifiers find the last token so
    positions = getattr(model.config, "max_position_embeddings", None) or 2**31
    eos = model.generation_config.eos_token_id if task == "text-generation" else None
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=torch.device(device),
        context=int(min(positions, tokenizer.model_max_length)),
        eos_ids=frozenset(eos_ids),
    )


def run_task(lm: LoadedModel, task: str, items: dict[int, BaseModel]) -> dict[int, Any]:
    """Outputs (or ``ItemError``) by item index."""
    if not items:
        return {}
    with torch.inference_mode():
        if task == "text-generation":
            return _generate(lm, {i: _as(GenerationInput, x) for i, x in items.items()})
        texts = {i: _as(TextInput, x).text for i, x in items.items()}
        return _classify(lm, texts) if task == "text-classification" else _embed(lm, texts)


class _PerRowLimit(StoppingCriteria):
    """Stops each row at its own ``max_new_tokens``, so one batch serves different limits."""

    def __init__(self, prompt_length: int, limits: torch.Tensor) -> None:
        self.prompt_length, self.limits = prompt_length, limits

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        done: torch.Tensor = (input_ids.shape[1] - self.prompt_length) >= self.limits
        return done


def _generate(lm: LoadedModel, items: dict[int, GenerationInput]) -> dict[int, Any]:
    outputs: dict[int, Any] = {}
    greedy: list[tuple[int, list[int], GenerationInput]] = []
    sampled: list[tuple[int, list[int], GenerationInput]] = []
    for i, item in items.items():
        ids: list[int] = lm.tokenizer(item.prompt)["input_ids"]
        if not ids:
            outputs[i] = ItemError("invalid_input", "prompt is empty once tokenized")
        elif len(ids) + item.max_new_tokens > lm.context:
            outputs[i] = ItemError(
                "invalid_input",
                f"prompt is {len(ids)} tokens; with max_new_tokens {item.max_new_tokens} that "
                f"exceeds the model's context of {lm.context} tokens: shorten the prompt or "
                "ask for fewer tokens",
            )
        else:
            (sampled if item.temperature > 0 else greedy).append((i, ids, item))
    if greedy:
        outputs.update(_generate_batch(lm, greedy, seed=None))
    for one in sampled:
        # One at a time from its own seed: the same seed gives the same text in any batch.
        seed = one[2].seed if one[2].seed is not None else secrets.randbelow(2**63)
        torch.manual_seed(seed)
        outputs.update(_generate_batch(lm, [one], seed=seed))
    return outputs


def _generate_batch(
    lm: LoadedModel, rows: list[tuple[int, list[int], GenerationInput]], seed: int | None
) -> dict[int, Any]:
    tokenizer = lm.tokenizer
    batch = tokenizer.pad({"input_ids": [ids for _, ids, _ in rows]}, return_tensors="pt")
    input_ids = batch["input_ids"].to(lm.device)
    limits = [item.max_new_tokens for _, _, item in rows]
    stop = _PerRowLimit(input_ids.shape[1], torch.tensor(limits, device=lm.device))
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": rows[0][2].temperature}
        if seed is not None
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    started = time.perf_counter()
    sequences = lm.model.generate(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"].to(lm.device),
        max_new_tokens=max(limits),
        stopping_criteria=StoppingCriteriaList([stop]),
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    elapsed = max(time.perf_counter() - started, 1e-9)
    new_tokens = sequences[:, input_ids.shape[1] :].tolist()
    outputs: dict[int, Any] = {}
    for (i, _, item), tokens in zip(rows, new_tokens, strict=True):
        tokens = tokens[: item.max_new_tokens]
        end = next((k + 1 for k, t in enumerate(tokens) if t in lm.eos_ids), len(tokens))
        tokens = tokens[:end]  # after an eos come pad tokens
        outputs[i] = {
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "tokens": len(tokens),
            "tokens_per_s": round(len(tokens) / elapsed, 3),
            "seed": seed,
        }
    return outputs


def _encode(lm: LoadedModel, texts: dict[int, str]) -> tuple[dict[int, Any], list[int], Any]:
    """Item errors, the indices of the encoded rows, and their padded batch (or None)."""
    errors: dict[int, Any] = {}
    encodings, order = [], []
    for i, text in texts.items():
        encoding = lm.tokenizer(text, truncation=True, max_length=lm.context)
        if not encoding["input_ids"]:
            errors[i] = ItemError("invalid_input", "text is empty once tokenized")
        else:
            encodings.append(encoding)
            order.append(i)
    if not encodings:
        return errors, order, None
    batch = lm.tokenizer.pad(encodings, return_tensors="pt")
    return errors, order, {k: v.to(lm.device) for k, v in batch.items()}


def _classify(lm: LoadedModel, texts: dict[int, str]) -> dict[int, Any]:
    outputs, order, batch = _encode(lm, texts)
    if batch is None:
        return outputs
    probabilities = lm.model(**batch).logits.float().softmax(dim=-1)
    scores, labels = probabilities.max(dim=-1)
    id2label = lm.model.config.id2label or {}
    for i, score, label in zip(order, scores.tolist(), labels.tolist(), strict=True):
        outputs[i] = {"label": str(id2label.get(label, label)), "score": score}
    return outputs


def _embed(lm: LoadedModel, texts: dict[int, str]) -> dict[int, Any]:
    outputs, order, batch = _encode(lm, texts)
    if batch is None:
        return outputs
    hidden = lm.model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    for i, embedding in zip(order, pooled.tolist(), strict=True):
        outputs[i] = {"embedding": embedding}
    return outputs


def _as(cls: type[_Item], item: BaseModel) -> _Item:
    if not isinstance(item, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(item).__name__}")
    return item
