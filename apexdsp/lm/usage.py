"""Count the LM calls and tokens of one program run, on top of DSPy's own usage tracker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import dspy
from dspy.utils.usage_tracker import UsageTracker, track_usage


@dataclass
class UsageCount:
    """Calls and tokens seen by a :func:`count_lm_usage` context (filled in when the context exits)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, tracker: UsageTracker) -> None:
        for entries in tracker.usage_data.values():
            self.calls += len(entries)
            for entry in entries:
                self.prompt_tokens += int(entry.get("prompt_tokens") or 0)
                self.completion_tokens += int(entry.get("completion_tokens") or 0)


@contextlib.contextmanager
def count_lm_usage() -> Iterator[UsageCount]:
    """Count every (non-cached) LM call made in this context and its token usage.

    DSPy records usage only while ``track_usage`` is on; it is switched on for the context. Each call adds
    one entry to DSPy's tracker, so the number of entries is the number of LM calls.
    """
    count = UsageCount()
    with dspy.settings.context(track_usage=True), track_usage() as tracker:
        try:
            yield count
        finally:
            count.add(tracker)
