"""A chat adapter that tolerates small models' broken formats, and records what it had to repair.

DSPy's ChatAdapter asks the LM to answer in ``[[ ## field ## ]]`` sections and raises
``AdapterParseError`` when a section is missing, then retries the whole call through the JSON adapter. A
135M-parameter model misses sections often and is no better at JSON, so that retry doubles the cost for
nothing. :class:`TolerantChatAdapter` keeps the ChatAdapter's prompt format (so prompts, demos and GRPO
completions are identical to DSPy's), but on a parse failure it salvages what it can: with a single output
field the bare completion *is* the field; missing string fields become ``""``; missing typed fields
``None``. Every repair is reported to the active :class:`ParseFailureLog`, so that programs can put parse
failures into their trajectory and rewards can score them.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from dspy.adapters.chat_adapter import ChatAdapter, field_header_pattern
from dspy.adapters.utils import parse_value
from dspy.utils.exceptions import AdapterParseError

_ANY_HEADER = re.compile(r"\[{1,2}\s*#{1,3}\s*\w+\s*#{1,3}\s*\]{1,2}")
# Small models write the header with the spacing off (``[[## answer ## ]]``, ``[[ ##answer##]]``).
_LOOSE_HEADER = re.compile(r"\[{1,2}\s*#{1,3}\s*(\w+)\s*#{1,3}\s*\]{1,2}")


@dataclass
class ParseFailure:
    """One LM completion that did not follow the format."""

    signature: str
    missing_fields: list[str]
    completion: str


@dataclass
class ParseFailureLog:
    """Collects the parse failures of one program run (see :func:`record_parse_failures`)."""

    failures: list[ParseFailure] = field(default_factory=list)


_active_log: contextvars.ContextVar[ParseFailureLog | None] = contextvars.ContextVar("apexdsp_parse_log",
                                                                                      default=None)


@contextlib.contextmanager
def record_parse_failures() -> Iterator[ParseFailureLog]:
    """Collect the adapter's repairs made in this context (thread-local, like DSPy's settings)."""
    log = ParseFailureLog()
    token = _active_log.set(log)
    try:
        yield log
    finally:
        _active_log.reset(token)


class TolerantChatAdapter(ChatAdapter):
    """ChatAdapter whose parse never fails: it repairs, and records the repair."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)

    def parse(self, signature, completion: str) -> dict[str, Any]:
        completion = canonical_headers(completion or "")
        try:
            return super().parse(signature, completion)
        except AdapterParseError as error:
            parsed = dict(error.parsed_result or {})
            fields = salvage_fields(signature, completion, parsed)
            missing = [name for name in signature.output_fields if name not in parsed]
            log = _active_log.get()
            if log is not None:
                log.failures.append(ParseFailure(signature.__name__, missing, completion))
            return fields


def salvage_fields(signature, completion: str, parsed: dict[str, Any]) -> dict[str, Any]:
    """Fill the output fields that the completion did not mark.

    A single-output signature takes the completion's text before any section header. Otherwise missing
    ``str`` fields become ``""`` and other types ``None`` (or their parse of ``""`` where that succeeds).
    """
    fields = dict(parsed)
    outputs = signature.output_fields
    bare = _ANY_HEADER.split(completion, maxsplit=1)[0].strip() if completion else ""
    for name, info in outputs.items():
        if name in fields:
            continue
        annotation = info.annotation
        if len(outputs) == 1 and bare:
            try:
                fields[name] = parse_value(bare, annotation)
                continue
            except (ValueError, TypeError):
                pass
        fields[name] = "" if annotation is str else None
    return fields


def canonical_headers(completion: str) -> str:
    """Rewrite loosely spaced section headers into the exact ``[[ ## name ## ]]`` form, each on its own line."""
    return _LOOSE_HEADER.sub(lambda m: f"\n[[ ## {m.group(1)} ## ]]\n", completion).strip()


def has_section_headers(completion: str) -> bool:
    """Whether a completion contains at least one ``[[ ## field ## ]]`` line."""
    return any(field_header_pattern.match(line.strip()) for line in completion.splitlines())
