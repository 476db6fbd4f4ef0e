"""Models: the ``ModelRunner`` protocol, the ``Model`` base class, model directories
(``model.yaml``) and the built-in demo model. Knows nothing of the queue."""

from gpufleet.models.base import Model
from gpufleet.models.runtime import Batching, ItemError, ModelInfo, ModelRunner

__all__ = ["Batching", "ItemError", "Model", "ModelInfo", "ModelRunner"]
