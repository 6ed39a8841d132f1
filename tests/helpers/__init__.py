"""Helpers the tests share: ports and HTTP waits, runner processes, tiny models, checkpoints, the seed."""
