"""The hf toolchain: torch + transformers builds that run anywhere, CPU or GPU.

:mod:`vlmforge.toolchains.hf.stages` holds the stages (convert, quantize, LLM, visual, engine, validate),
:mod:`~vlmforge.toolchains.hf.onnx` the visual export and :mod:`~vlmforge.toolchains.hf.saving` dtype-cast
saving; the torch-level pieces the runner shares live in :mod:`vlmforge.modeling`, everything
family-specific in the family modules (:mod:`vlmforge.families`). Importing this package does not import torch.
"""
