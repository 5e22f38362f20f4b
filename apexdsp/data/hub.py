"""Map rows of the Hugging Face hub versions of the four benchmarks into :class:`Question` records.

The mapping functions are pure (one row in, one record out), so they are tested on hand-built rows
shaped like the hub's, while the hub itself is out of reach. Shapes handled:

* HotpotQA, ``hotpotqa/hotpot_qa`` config ``distractor``: ``id, question, answer, type, level,
  supporting_facts {title: [...], sent_id: [...]}, context {title: [...], sentences: [[...]]}``.
* 2WikiMultihopQA, ``framolfese/2WikiMultihopQA`` (HotpotQA-style dicts) and the authors' JSON
  (``_id``; ``context`` as ``[[title, [sentences]]]``, ``supporting_facts`` as ``[[title, sent_id]]``;
  either may also arrive JSON-encoded as a string).
* MuSiQue, ``dgslibisey/MuSiQue`` / the authors' JSONL: ``id, question, answer, answer_aliases,
  paragraphs [{idx, title, paragraph_text, is_supporting}], question_decomposition [{question,
  answer, paragraph_support_idx}]``. The type (``2hop``, ``3hop``, ``4hop``) comes from the id prefix.
* Bamboogle, ``chiayewken/bamboogle`` (split ``test``): ``Question, Answer``; ids are ``bamboogle-<row>``.

Like ``shared/data``, ``supporting_titles`` is the sorted set of gold titles.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from apexdsp.data.records import DecompositionStep, Paragraph, Question, describe_validation_error
from apexdsp.errors import ApexError, DataError

__all__ = [
    "HubDataset",
    "HUB_DATASETS",
    "MissingField",
    "join_sentences",
    "from_hotpotqa",
    "from_2wikimultihopqa",
    "from_musique",
    "from_bamboogle",
    "load_hub_questions",
]


class MissingField(KeyError):
    """A hub row lacks a field the mapping needs (turned into a DataError naming dataset and row)."""


def _get(row: Mapping[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``row`` (hub versions spell some fields differently)."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise MissingField(names[0])


def _decoded(value: Any) -> Any:
    """Some hub copies store nested fields as JSON strings."""
    return json.loads(value) if isinstance(value, str) else value


def join_sentences(sentences: Iterable[str]) -> str:
    """Join a paragraph's sentences, adding a space only where neither side brings whitespace.

    HotpotQA sentences keep their leading space, so they rejoin into the original paragraph exactly;
    2WikiMultihopQA sentences carry none and would otherwise run together ("Elmham.The date").
    """
    text = ""
    for sentence in sentences:
        if text and sentence and not text[-1].isspace() and not sentence[0].isspace():
            text += " "
        text += sentence
    return text.strip()


def _titled_sentences(context: Any) -> list[tuple[str, list[str]]]:
    """``{title: [...], sentences: [[...]]}`` or ``[[title, [sentences]], ...]`` as (title, sentences) pairs."""
    context = _decoded(context)
    if isinstance(context, Mapping):
        return list(zip(context["title"], context["sentences"], strict=True))
    return [(pair[0], list(pair[1])) for pair in context]


def _supporting_title_set(supporting_facts: Any) -> set[str]:
    """Titles of ``{title: [...], sent_id: [...]}`` or ``[[title, sent_id], ...]``."""
    facts = _decoded(supporting_facts)
    if isinstance(facts, Mapping):
        return set(facts["title"])
    return {fact[0] for fact in facts}


def _from_hotpot_shape(row: Mapping[str, Any], question_id: str, level: str | None) -> Question:
    supporting = _supporting_title_set(_get(row, "supporting_facts"))
    paragraphs = [
        Paragraph(title=title, text=join_sentences(sentences), is_supporting=title in supporting)
        for title, sentences in _titled_sentences(_get(row, "context"))
    ]
    return Question(
        id=question_id,
        question=_get(row, "question"),
        answer=_get(row, "answer"),
        type=row.get("type"),
        level=level,
        supporting_titles=sorted(supporting),
        paragraphs=paragraphs,
    )


def from_hotpotqa(row: Mapping[str, Any], index: int = 0) -> Question:
    """A ``hotpotqa/hotpot_qa`` (distractor) row, or a row of the official JSON (``_id``, list context)."""
    return _from_hotpot_shape(row, str(_get(row, "id", "_id")), row.get("level"))


def from_2wikimultihopqa(row: Mapping[str, Any], index: int = 0) -> Question:
    """A 2WikiMultihopQA row, hub (``id``, dict context) or original (``_id``, list context)."""
    return _from_hotpot_shape(row, str(_get(row, "_id", "id")), None)


_HOPS = re.compile(r"^(\d+hop)")


def from_musique(row: Mapping[str, Any], index: int = 0) -> Question:
    """A MuSiQue-Ans row with its paragraphs and gold decomposition."""
    question_id = str(_get(row, "id"))
    paragraphs = [
        Paragraph(
            title=_get(paragraph, "title"),
            text=_get(paragraph, "paragraph_text", "text"),
            is_supporting=str(paragraph.get("is_supporting", False)).lower() == "true",
        )
        for paragraph in _decoded(_get(row, "paragraphs"))
    ]
    steps = _decoded(row.get("question_decomposition") or [])
    decomposition = [
        DecompositionStep(question=_get(step, "question"), answer=step.get("answer") or "") for step in steps
    ]
    hops = _HOPS.match(question_id)
    return Question(
        id=question_id,
        question=_get(row, "question"),
        answer=_get(row, "answer"),
        answer_aliases=list(_decoded(row.get("answer_aliases") or [])),
        type=hops.group(1) if hops else None,
        supporting_titles=sorted({p.title for p in paragraphs if p.is_supporting}),
        paragraphs=paragraphs,
        decomposition=decomposition or None,
    )


def from_bamboogle(row: Mapping[str, Any], index: int = 0) -> Question:
    """A Bamboogle row: a question and an answer, no evidence; the row number makes the id."""
    return Question(
        id=f"bamboogle-{index}", question=_get(row, "Question", "question"), answer=_get(row, "Answer", "answer")
    )


@dataclass(frozen=True)
class HubDataset:
    """Where a benchmark lives on the hub and how its rows become questions."""

    path: str
    config: str | None
    default_split: str
    to_question: Callable[[Mapping[str, Any], int], Question]


HUB_DATASETS: dict[str, HubDataset] = {
    "hotpotqa": HubDataset("hotpotqa/hotpot_qa", "distractor", "validation", from_hotpotqa),
    "2wikimultihopqa": HubDataset("framolfese/2WikiMultihopQA", None, "validation", from_2wikimultihopqa),
    "musique": HubDataset("dgslibisey/MuSiQue", None, "validation", from_musique),
    "bamboogle": HubDataset("chiayewken/bamboogle", None, "test", from_bamboogle),
}


def map_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> list[Question]:
    """Map hub rows of dataset ``name``; a bad row raises a DataError naming the dataset, row and field."""
    to_question = HUB_DATASETS[name].to_question
    questions = []
    for index, row in enumerate(rows):
        try:
            questions.append(to_question(row, index))
        except MissingField as error:
            raise DataError(f"hub dataset {name} row {index}: field '{error.args[0]}' missing") from None
        except ValidationError as error:
            raise DataError(f"hub dataset {name} row {index}: {describe_validation_error(error)}") from None
        except (KeyError, TypeError, ValueError, IndexError) as error:
            shape = f"unexpected shape ({type(error).__name__}: {error})"
            raise DataError(f"hub dataset {name} row {index}: {shape}") from None
    return questions


def load_hub_questions(
    name: str, split: str | None = None, limit: int | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> list[Question]:
    """Download (or read from the ``datasets`` cache) a benchmark split and map it into questions."""
    spec = HUB_DATASETS[name]
    split = split or spec.default_split
    selection = split if limit is None else f"{split}[:{limit}]"
    try:
        from datasets import load_dataset

        cache = os.fspath(cache_dir) if cache_dir is not None else None
        rows = load_dataset(spec.path, spec.config, split=selection, cache_dir=cache)
    except Exception as error:  # offline, unknown split, missing cache: all user-fixable, all one line
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ApexError(
            f"cannot load hub dataset {name} ({spec.path}, split {split}): the Hugging Face hub is unreachable "
            f"or the split is unknown ({reason}); pass a JSONL file instead, e.g. one of shared/data"
        ) from None
    return map_rows(name, rows)
