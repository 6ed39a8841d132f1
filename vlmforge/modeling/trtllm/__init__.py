"""TensorRT-LLM checkpoints at the torch level: what config.json may hold, writing (ModelOpt's exporter, an OPT
converter) and reading back."""
