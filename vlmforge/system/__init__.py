"""This machine: library versions, hardware, installed toolchains, processes."""
