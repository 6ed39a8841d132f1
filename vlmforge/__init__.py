"""vlmforge: turn multimodal models into TensorRT-LLM (or hf) engines, store them and serve them."""

__version__ = "0.1.0"
