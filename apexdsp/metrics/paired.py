"""Paired comparison of two evaluations of the same questions: per-question differences, wins and losses,
and a bootstrap confidence interval of the mean difference.

With 300 questions one EM point is three questions, so whether a compiled program beats the uncompiled one
is a question for the per-question differences, not for two means read side by side: the same questions
are answered by both, and resampling the questions (with replacement) gives the spread of the mean
difference that a new draw of questions would show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """``new - base`` over questions both answered: mean, 95% interval, and how many moved which way."""

    metric: str
    n: int
    base: float
    new: float
    difference: float
    low: float
    high: float
    wins: int  # questions where new scored higher
    losses: int  # ... lower

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | int | str | bool]:
        return {**asdict(self), "significant": self.significant}


def paired_difference(base: Sequence[float], new: Sequence[float], *, metric: str = "em", resamples: int = 10_000,
                      confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """Paired ``new - base`` of per-question scores (same order), with a percentile bootstrap interval."""
    if len(base) != len(new):
        raise ValueError(f"paired scores need the same questions: {len(base)} against {len(new)}")
    if not base:
        raise ValueError("no question to compare")
    a, b = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    diff = b - a
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(metric, len(diff), float(a.mean()), float(b.mean()), float(diff.mean()), float(low),
                            float(high), int((diff > 0).sum()), int((diff < 0).sum()))


def paired_by_id(base: Mapping[str, float], new: Mapping[str, float], **options) -> PairedDifference:
    """:func:`paired_difference` over the question ids both evaluations scored."""
    shared = sorted(set(base) & set(new))
    return paired_difference([base[i] for i in shared], [new[i] for i in shared], **options)


__all__ = ["PairedDifference", "paired_by_id", "paired_difference"]
