"""``python -m vlmforge``: the same as the ``vlmforge`` command."""

from vlmforge.cli import main

main()
