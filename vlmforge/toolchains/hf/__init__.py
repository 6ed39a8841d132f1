"""The hf toolchain: torch + transformers builds that run anywhere, CPU or GPU.

:mod:`vlmforge.toolchains.hf.common` holds the family-agnostic helpers (local tokenizers, golden
images, ONNX export and comparison, greedy decoding, dtype-cast saving, weight-only quantization);
everything family-specific lives in the family modules (:mod:`vlmforge.families`). Importing this
package does not import torch.
"""
