"""User-facing errors.

An :class:`ApexError` is a problem the user can fix (a missing file, a malformed line, an unknown
model name). The CLI prints its message on one line and exits with status 2, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ApexError(Exception):
    """A problem with the user's input or environment, described in one line."""

    exit_code = 2


class DataError(ApexError):
    """A data file that is missing, unreadable or malformed. The message names file, line and field."""


class ModelNotAvailable(ApexError):
    """A model name that the registry does not know, or whose package is not installed."""
