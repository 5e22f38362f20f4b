"""A chat adapter that tolerates small models' broken formats, and records what it had to repair.

DSPy's ChatAdapter asks the LM to answer in ``[[ ## field ## ]]`` sections and raises
``AdapterParseError`` when a section is missing, then retries the whole call through the JSON adapter. A
135M-parameter model misses sections often and is no better at JSON, so that retry doubles the cost for
nothing. :class:`TolerantChatAdapter` keeps the ChatAdapter's prompt format (so prompts, demos and GRPO
completions are identical to DSPy's), but on a parse failure it salvages what it can: with a single output
field the bare completion *is* the field; missing string fields become ``""``; missing typed fields
``None``. Every repair is reported to the active :class:`ParseFailureLog`, so that programs can put parse
failures into their trajectory and rewards can score them.

It also **prefills** the reply. Given DSPy's prompt, SmolLM2-135M opens its reply with a section of the
*input* (``[[ ## question ## ]]`` and the question again) in 14 of 40 answer calls measured, leaving the
output field empty. With a local engine the adapter therefore writes the first output field's header into
the assistant turn and the model continues it (``continue_final_message``, as TRL does for a prompt ending
in an assistant message); the header is put back in front of the reply before parsing, so callers see
DSPy's format unchanged. Remote LMs (an OpenAI-compatible server) get DSPy's messages as they are.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from dspy.adapters.chat_adapter import ChatAdapter, field_header_pattern
from dspy.adapters.utils import parse_value
from dspy.utils.exceptions import AdapterParseError

CHOICE_BIAS = "choice_bias"  # LM setting of one call: offsets per choice (ChoicePredict); never sent on

_ANY_HEADER = re.compile(r"\[{1,2}\s*#{1,3}\s*\w+\s*#{1,3}\s*\]{1,2}")
# Small models write the header with the spacing off (``[[## answer ## ]]``, ``[[ ##answer##]]``).
_LOOSE_HEADER = re.compile(r"\[{1,2}\s*#{1,3}\s*(\w+)\s*#{1,3}\s*\]{1,2}")
_REPEATED_HEADER = re.compile(r"(\[\[ ## (\w+) ## \]\])(?:\s*\[\[ ## \2 ## \]\])+")


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


_prefilling: contextvars.ContextVar[bool] = contextvars.ContextVar("apexdsp_prefilling", default=False)

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
    """ChatAdapter whose parse never fails (it repairs, and records the repair), and which prefills the
    first output header for local models (``prefill=False`` turns that off)."""

    def __init__(self, *, prefill: bool = True, **kwargs: Any):
        kwargs.setdefault("use_json_adapter_fallback", False)
        super().__init__(**kwargs)
        self.prefill = prefill

    def reply_prefix(self, signature, lm: Any = None) -> str:
        """What the assistant turn starts with for ``signature`` on ``lm`` ("" when nothing is prefilled)."""
        if not self.prefill or not prefills(lm) or not signature.output_fields:
            return ""
        return _first_header(signature)

    def format_call(self, signature, demos: list[dict[str, Any]], inputs: dict[str, Any],
                    lm: Any = None) -> list[dict[str, Any]]:
        """The messages one call sends to ``lm``: DSPy's format, then the prefilled assistant turn if any
        (what GRPO trains on must be what the program sends)."""
        with self._prefilled(signature, lm, {}):
            return self.format(signature, demos, inputs)

    def __call__(self, lm, lm_kwargs, signature, demos, inputs):
        with self._prefilled(signature, lm, lm_kwargs) as lm_kwargs:
            return super().__call__(lm, lm_kwargs, signature, demos, inputs)

    async def acall(self, lm, lm_kwargs, signature, demos, inputs):
        with self._prefilled(signature, lm, lm_kwargs) as lm_kwargs:
            return await super().acall(lm, lm_kwargs, signature, demos, inputs)

    @contextlib.contextmanager
    def _prefilled(self, signature, lm, lm_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """For one call: mark it prefilled (read by ``format`` and ``_call_postprocess``) and add the
        choice constraint to the LM settings where it applies."""
        prefilled = bool(self.reply_prefix(signature, lm))
        lm_kwargs = dict(lm_kwargs)
        bias = lm_kwargs.pop(CHOICE_BIAS, None)  # calibrated offsets: never sent to the LM itself
        token = _prefilling.set(prefilled)
        try:
            yield {**lm_kwargs, **(choice_constraint(signature, lm, bias) if prefilled else {})}
        finally:
            _prefilling.reset(token)

    def format(self, signature, demos, inputs) -> list[dict[str, Any]]:
        messages = super().format(signature, demos, inputs)
        if _prefilling.get():
            messages.append({"role": "assistant", "content": _first_header(signature)})
        return messages

    def _call_postprocess(self, processed_signature, original_signature, outputs, lm, lm_kwargs):
        if _prefilling.get():
            outputs = [with_prefix(_first_header(processed_signature), output) for output in outputs]
        return super()._call_postprocess(processed_signature, original_signature, outputs, lm, lm_kwargs)

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


def prefills(lm: Any) -> bool:
    """Whether ``lm`` continues a prefilled assistant turn: apexdsp's in-process engines do (their model
    strings start with ``local/``); a LiteLLM model would treat the turn as finished context."""
    return str(getattr(lm, "model", "")).startswith("local/")


def _first_header(signature) -> str:
    # No trailing newline: the chat template's continue_final_message strips it from the rendered turn.
    return f"[[ ## {next(iter(signature.output_fields))} ## ]]"


def choice_constraint(signature, lm: Any, bias: dict[str, float] | None = None) -> dict[str, Any]:
    """LM settings that make a local model pick one of a ``Literal`` output's choices.

    For a signature whose only output is a ``Literal`` whose choices are each one token (``yes``/``no``),
    the reply after the prefilled header is one token, biased to those choices (and their capitalised and
    space-led forms): the model's own preference between them decides, shifted by ``bias`` (a calibrated
    offset per choice, :class:`apexdsp.programs.choice.ChoicePredict`). SmolLM2-135M, asked freely, wrote a
    passage marker (``[1] Gagea:``) instead of yes or no on every yes/no question tried. Other signatures,
    and choices of several tokens, get no constraint ({}).
    """
    outputs = list(signature.output_fields.values())
    tokenizer = getattr(getattr(lm, "engine", None), "tokenizer", None)
    if len(outputs) != 1 or get_origin(outputs[0].annotation) is not Literal or tokenizer is None:
        return {}
    tokens = _choice_tokens(tokenizer, get_args(outputs[0].annotation))
    offsets = {str(k): float(v) for k, v in (bias or {}).items()}
    return ({"max_tokens": 1, "logit_bias": {str(token): 100 + offsets.get(choice, 0.0) for token, choice in tokens}}
            if tokens else {})


@functools.lru_cache(maxsize=64)
def _choice_tokens(tokenizer: Any, choices: tuple) -> tuple[tuple[int, str], ...]:
    """The token ids :func:`choice_constraint` allows for one tokenizer and choice set, each with the choice
    it spells (empty: a choice is not one token), worked out once: every yes/no call of a run asks for the
    same ones."""
    allowed: dict[int, str] = {}
    for choice in choices:
        for form in {str(choice), str(choice).capitalize(), f" {choice}", f" {str(choice).capitalize()}"}:
            ids = tokenizer.encode(form, add_special_tokens=False)
            if len(ids) == 1 and allowed.setdefault(ids[0], str(choice)) == str(choice):
                continue
            if form == str(choice):  # the bare choice is not one token: no constraint
                return ()
    return tuple(sorted(allowed.items()))


def with_prefix(prefix: str, output: Any) -> Any:
    """An LM output (text, or DSPy's dict with ``text``) with the prefilled ``prefix`` put back in front."""
    if isinstance(output, dict):
        return {**output, "text": prefix + (output.get("text") or "")}
    return prefix + (output or "")


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
        choice = leading_choice(annotation, section_text(completion, name) or (bare if len(outputs) == 1 else ""))
        if choice is not None:
            fields[name] = choice
            continue
        if len(outputs) == 1 and bare:
            try:
                fields[name] = parse_value(bare, annotation)
                continue
            except (ValueError, TypeError):
                pass
        fields[name] = "" if annotation is str else None
    return fields


def section_text(completion: str, name: str) -> str:
    """The text under ``[[ ## name ## ]]`` up to the next header ("" if there is no such section)."""
    match = re.search(rf"\[\[ ## {re.escape(name)} ## \]\](.*?)(?=\[\[ ## \w+ ## \]\]|$)", completion, re.DOTALL)
    return match.group(1).strip() if match else ""


def leading_choice(annotation: Any, text: str) -> Any:
    """For a ``Literal`` field, the choice the text opens with, ignoring case and what follows
    ("Yes, both are American." -> "yes"); ``None`` for other fields or no match."""
    if get_origin(annotation) is not Literal or not text:
        return None
    first = re.match(r"[\w-]+", text.strip().strip("\"'*"))
    for choice in get_args(annotation):
        if first and str(choice).lower() == first.group(0).lower():
            return choice
    return None


def canonical_headers(completion: str) -> str:
    """Rewrite loosely spaced section headers into the exact ``[[ ## name ## ]]`` form, each on its own line,
    and collapse a header written twice in a row (a model that repeats a prefilled header)."""
    text = _LOOSE_HEADER.sub(lambda m: f"\n[[ ## {m.group(1)} ## ]]\n", completion).strip()
    return _REPEATED_HEADER.sub(r"\1", text)


def has_section_headers(completion: str) -> bool:
    """Whether a completion contains at least one ``[[ ## field ## ]]`` line."""
    return any(field_header_pattern.match(line.strip()) for line in completion.splitlines())
