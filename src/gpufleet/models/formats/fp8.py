"""Weight-only fp8: Linear weights stored as ``float8_e4m3fn`` with one float32 scale per
output channel, computed in bf16. Halves a bf16 model's weight memory.

On CUDA devices of compute capability 8.9 or newer the matmul runs in fp8 through
``torch._scaled_mm`` (activations quantized per row on the fly); elsewhere, or if that call
fails once, the weight is dequantized to bf16 for each matmul. Imports torch: load it lazily.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# torch._scaled_mm needs both matrix dimensions of the weight to be multiples of 16.
_ALIGN = 16
_scaled_mm_failed: set[torch.device] = set()


class Fp8Linear(torch.nn.Module):
    """``y = x @ (weight * scale).T + bias`` with ``weight`` in fp8 and ``scale`` per output."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """``weight``: (out_features, in_features) in any float dtype."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        # Buffers, not parameters: nothing should train them, and .to(dtype) must not be used.
        # Row-major whatever the source's layout (GPT-2's Conv1D hands us a transposed view):
        # its .t() is then the column-major operand that _scaled_mm wants.
        fp8_weight = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
        self.register_buffer("weight", fp8_weight)
        self.register_buffer("weight_scale", scale.squeeze(1).contiguous())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and _can_scaled_mm(x.device):
            try:
                return self._forward_scaled_mm(x)
            except RuntimeError as exc:  # an unsupported layout or build: dequantize from now on
                _scaled_mm_failed.add(x.device)
                logger.warning(
                    "torch._scaled_mm failed on %s, dequantizing instead: %s", x.device, exc
                )
        weight = (self.weight.float() * self.weight_scale[:, None]).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
        x_fp8 = (rows / row_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(
            x_fp8,
            self.weight.t(),  # column-major, as _scaled_mm wants its second operand
            scale_a=row_scale,
            scale_b=self.weight_scale[None, :],
            out_dtype=torch.bfloat16,
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def quantize_fp8_(model: torch.nn.Module, skip: Iterable[torch.nn.Module] = ()) -> int:
    """Replace ``model``'s Linear layers (and transformers' GPT-2 style ``Conv1D``) by
    ``Fp8Linear``, in place; returns how many. Layers in ``skip`` (the output embeddings:
    often tied to the input ones) and layers with a dimension that is not a multiple of 16
    (small heads, where fp8 saves nothing) stay as they are."""
    skipped = {id(module) for module in skip}
    replacements = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if id(child) in skipped:
                continue
            weight = _linear_weight(child)
            if weight is not None and all(n % _ALIGN == 0 for n in weight.shape):
                replacements.append((parent, name, weight, getattr(child, "bias", None)))
    for parent, name, weight, bias in replacements:
        setattr(parent, name, Fp8Linear(weight, bias))
    return len(replacements)


def _linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear layer, or None for any other module."""
    if isinstance(module, torch.nn.Linear):
        return module.weight
    # transformers.pytorch_utils.Conv1D: y = x @ W + b with W of shape (in, out).
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        weight = module.weight
        return weight.t() if isinstance(weight, torch.Tensor) else None
    return None


@functools.cache
def _has_fp8_tensor_cores(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 9) and hasattr(torch, "_scaled_mm")


def _can_scaled_mm(device: torch.device) -> bool:
    return device not in _scaled_mm_failed and _has_fp8_tensor_cores(device)
