"""The trtllm toolchain: TensorRT-LLM build plans and their execution in NVIDIA's container."""
