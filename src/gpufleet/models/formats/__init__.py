"""Loaders for model files made by other tools: ``torchscript``, ``onnx`` and ``hf``
(transformers), each served as a ``ModelRunner`` with the precision ``model.yaml`` asks for.

``create_runner`` checks the model directory and reads only small metadata (``config.json``,
the ONNX graph without external data); weights load in ``runner.load(device)``. torch,
onnxruntime and transformers are imported there too, never when gpufleet is imported.

Inputs and outputs (one item; ``predict`` takes a batch of them)

* ``torchscript`` / ``onnx`` (tensor models). An input is a nested list of numbers for a model
  with one input, else ``{"inputs": {input_name: nested list, ...}}``. Items are stacked along a
  new first dimension, so an item leaves the batch dimension out. Items whose shapes differ run
  in separate groups. The output is a nested list for a model with one output, else
  ``{output_name: nested list}`` (TorchScript tuples are named ``output_0``, ``output_1``, ...).
  An item with the wrong shape, names or dtype gets ``ItemError("invalid_input", ...)``; the
  rest of the batch still runs. ONNX takes dtypes and shapes from the graph's declared inputs.
  TorchScript declares neither: each input takes the dtype of ``example_input``'s values for it
  (whole numbers: int64, else the model's float dtype) and the model itself checks shapes.
* ``hf``, ``task: text-generation``: ``{"prompt": str, "max_new_tokens": 1-1024 = 32,
  "temperature": 0-5 = 0 (greedy), "seed": int | null}`` -> ``{"text", "tokens",
  "tokens_per_s", "seed"}``; greedy items share one left-padded ``generate``, sampled items run
  one by one after ``torch.manual_seed(seed)`` so a seed gives the same text in any batch.
* ``hf``, ``task: text-classification``: ``{"text": str}`` -> ``{"label", "score"}`` (softmax).
* ``hf``, ``task: feature-extraction``: ``{"text": str}`` -> ``{"embedding": [float, ...]}``
  (last hidden state, mean over the text's tokens).

Precision: ``fp32`` / ``fp16`` / ``bf16`` cast TorchScript modules and load transformers models
in that dtype; ONNX models carry their own and must match ``model.yaml``. ``fp8`` (``hf`` only)
stores Linear weights as float8 e4m3 with one scale per output channel (see ``fp8.py``).
"""

from gpufleet.models.formats.loader import (
    DEFAULT_BATCHING,
    FORMATS,
    HF_TASKS,
    PRECISIONS,
    create_runner,
)

__all__ = ["DEFAULT_BATCHING", "FORMATS", "HF_TASKS", "PRECISIONS", "create_runner"]
