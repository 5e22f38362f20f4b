"""What every reward returns, and the registry that lets configs name a reward.

A reward is a pure function of a question record and what a program produced (a full
:class:`~apexdsp.programs.trajectory.Trajectory`, or for some rewards just a raw completion or an answer
string). It returns one float, the value an optimizer maximises, *and* the named components it was built
from: the bootstrapping optimizer filters demos on the value, GRPO trains on it, and reports plot the
components, because a single number cannot say whether a plan lost points on its format or on its search.

Rewards never raise on malformed program output (an empty completion, a ``None`` answer, a question with
no supporting titles): such output scores low, with a note saying why. A wrong *call* (an unknown reward
name, a bad option) is the caller's bug and raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from apexdsp.errors import ApexError

__all__ = ["RewardResult", "RewardFn", "REWARDS", "register_reward", "get_reward", "weighted_mean"]


@dataclass(frozen=True)
class RewardResult:
    """A reward value with the components it was computed from and notes on what was skipped or repaired.

    ``components`` are the named parts (each a float, most in [0, 1]); a component that could not be
    computed for this input (no gold decomposition, no retriever...) is absent rather than 0, so averages
    over a dataset are not dragged down by what was never measured. ``notes`` say why.
    """

    value: float
    components: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        values = [self.value, *self.components.values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError(f"reward values must be finite floats, got {self.value!r} {self.components!r}")


class RewardFn(Protocol):
    """``reward(question, output, **options) -> RewardResult``; ``output`` is a trajectory or a text."""

    def __call__(self, question: Any, output: Any, /, **options: Any) -> RewardResult: ...


REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a reward function available as ``REWARDS[name]`` (a name configs can use)."""

    def decorate(function: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not function:
            raise ValueError(f"reward {name!r} is registered twice")
        REWARDS[name] = function
        return function

    return decorate


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; an :class:`ApexError` listing the known names otherwise."""
    import apexdsp.rewards  # noqa: F401 - importing the package registers every reward

    try:
        return REWARDS[name]
    except KeyError:
        raise ApexError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None


def weighted_mean(components: dict[str, float], weights: dict[str, float]) -> float:
    """Mean of the components present, weighted by ``weights`` and renormalised over those present.

    Renormalising keeps every reward on the same [0, 1] scale whether or not an optional component (a
    gold decomposition, a retriever) was available for this question. No positive weight: 0.
    """
    total = sum(weights.get(name, 0.0) for name in components)
    if total <= 0:
        return 0.0
    return sum(weights.get(name, 0.0) * value for name, value in components.items()) / total
