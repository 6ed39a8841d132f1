"""vlmforge: turn multimodal models into TensorRT-LLM / hf engines and serve them."""
