"""The built-in demo model: ``digits``, a tiny diffusion model that draws handwritten digits."""

from gpufleet.models.demo.runner import DigitsRunner

__all__ = ["DigitsRunner"]
