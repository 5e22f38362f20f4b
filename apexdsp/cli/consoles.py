"""Rich consoles for commands whose output is often piped to a log (``apexdsp run ... > run.log``).

Rich wraps to 80 columns when the stream is not a terminal: a table loses the end of its labels
(``bootstrap+gr…``) and a step's cache path breaks over two lines. Piped, these consoles are 200 wide.
"""

from __future__ import annotations

import sys

from rich.console import Console


def wide_console(stderr: bool = False) -> Console:
    """The terminal's width on a terminal, 200 columns when piped."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 200)


__all__ = ["wide_console"]
