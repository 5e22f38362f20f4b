"""References that every copy of a program shares.

DSPy optimizers copy programs freely (``deepcopy()``, ``reset_copy()``: one copy per candidate, per
bootstrapping round). A program's learnable state (demos, instructions) must be copied; the index it
searches and a frozen generator it calls must not: copying a ColBERT index or a loaded model per candidate
would cost memory and seconds for nothing. Holding them in :class:`Shared` keeps every copy pointing at
the one instance.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Shared(Generic[T]):
    """A holder whose copies (shallow or deep) are itself."""

    __slots__ = ("value",)

    def __init__(self, value: T):
        self.value = value

    def __copy__(self) -> Shared[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Shared[T]:
        return self

    def __repr__(self) -> str:
        return f"Shared({self.value!r})"
