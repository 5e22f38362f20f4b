"""The ``apexdsp`` command line. Each command group lives in its own module and is mounted in :mod:`.app`."""

from apexdsp.cli.app import main

__all__ = ["main"]
