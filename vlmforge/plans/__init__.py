"""The vocabulary of TensorRT-LLM build plans: dialects, steps, layouts, the context families write in."""
