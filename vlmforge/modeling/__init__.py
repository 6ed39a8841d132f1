"""Torch-level pieces shared by the families, the build toolchains and the runner: devices, images,
generation from a prefix, the quantized-weights format. Importing a module here imports torch."""
