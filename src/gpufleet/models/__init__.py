"""Models: the ``ModelRunner`` protocol, model directories (``model.yaml``) and the built-in
demo model. Knows nothing of the queue."""

from gpufleet.models.runtime import Batching, ItemError, ModelInfo, ModelRunner

__all__ = ["Batching", "ItemError", "ModelInfo", "ModelRunner"]
