"""GPUs: discovery, the compatibility rules between models, CUDA and GPUs, and allocation.
Imports no GPU library at module level."""
