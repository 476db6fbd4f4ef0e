"""``Model``: the base class a model's own code subclasses (``format: python``).

A subclass defines ``predict`` and, if it needs them, ``load`` / ``warmup`` / ``unload``; the
loader (``directory.load_model_dir``) gives it the ``info`` and ``batching`` that
``model.yaml`` describes. ``ModelRunner`` stays the typing plug-in point: any class with the
same methods works without subclassing this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gpufleet.models.runtime import Batching, ModelInfo

if TYPE_CHECKING:
    from pydantic import BaseModel


class Model:
    """A model served by gpufleet: subclass it and define ``predict``.

    * ``__init__(model_dir)``: the model's directory (where its weights are); an override may
      take the directory or nothing. Build nothing heavy here: the API process builds the
      class too, to read what it publishes.
    * ``load(device)``: move weights onto ``device`` ("cpu" or "cuda:N"); this one records it
      in ``self.device``.
    * ``warmup()``: once after ``load``, before the first batch.
    * ``predict(inputs)``: a batch of inputs (decoded JSON values, at most
      ``batching.max_batch_size``) in, one output per input out, in order: a JSON value or
      ``ItemError`` for an input that fails alone.
    * ``unload()`` (optional): free device memory before the process exits.

    ``info`` (name, version, description, input schema, example) and ``batching`` come from
    ``model.yaml``; values set here are defaults that ``model.yaml`` overrides. ``input_model``
    (a pydantic model of one input) publishes its JSON Schema when ``model.yaml`` has no
    ``input_schema``; inputs that break the schema are refused at submit.
    """

    info: ModelInfo = ModelInfo(name="unnamed", version="0")
    batching: Batching = Batching()
    input_model: ClassVar[type[BaseModel] | None] = None

    def __init__(self, model_dir: str | Path | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device: str | None = None

    def load(self, device: str) -> None:
        self.device = device

    def warmup(self) -> None:
        pass

    def parse(self, item: Any) -> Any:
        """``item`` as an ``input_model`` instance (pydantic's ``ValidationError`` if it does
        not fit); the item itself when the class has no ``input_model``."""
        if self.input_model is None:
            return item
        return self.input_model.model_validate(item)
