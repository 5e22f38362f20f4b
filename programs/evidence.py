"""Searching, recording and presenting passages: the glue between a retriever and the LM's prompts.

Every search goes through :func:`search` / :func:`search_many`, which record the query and its hits in the
trajectory (so Hit and supporting-title recall are measured on exactly what the program saw) and turn a
failing retriever into an empty result plus a recorded error rather than a lost question. Passages are
shown to the LM truncated, because a 135M model's speed is dominated by prompt length.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from apexdsp.indexes.base import Retriever, SearchHit
from apexdsp.programs.planner import PLACEHOLDER
from apexdsp.programs.trajectory import RetrievedPassage, Trajectory

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 200
_NON_ANSWERS = {"", "unknown", "none", "n/a", "na", "not mentioned", "not found", "no answer", "not given",
                "not stated", "not available", "i don't know", "i do not know", "cannot be determined",
                "not provided", "no information", "not specified"}


def search(retriever: Retriever, query: str, k: int, trajectory: Trajectory, *, round: int = 0,
           step: int | None = None) -> list[SearchHit]:
    """Top-``k`` hits for one query, recorded in ``trajectory``; ``[]`` (and an error noted) on a fault."""
    return search_many(retriever, [query], k, trajectory, round=round, step=step)[0]


def search_many(retriever: Retriever, queries: Sequence[str], k: int, trajectory: Trajectory, *,
                round: int = 0, step: int | None = None) -> list[list[SearchHit]]:
    """Top-``k`` hits for each query with one ``search_batch`` call, each recorded in ``trajectory``."""
    results: list[list[SearchHit]] = [[] for _ in queries]
    todo = [i for i, query in enumerate(queries) if query.strip()]  # retrievers reject blank queries
    if len(todo) < len(queries):
        trajectory.notes.append(f"{len(queries) - len(todo)} blank search queries skipped")
    if not todo:
        return results
    trajectory.queries.extend(queries[i] for i in todo)
    try:
        found = retriever.search_batch([queries[i] for i in todo], k=k)
    except Exception as error:  # noqa: BLE001 - a broken search costs this search, not the question
        logger.warning("search failed for %r: %s", [queries[i] for i in todo][:3], error)
        trajectory.errors.append(f"search failed: {type(error).__name__}: {error}")
        return results
    for i, hits in zip(todo, found, strict=True):
        results[i] = list(hits)
    for query, hits in zip(queries, results, strict=True):
        trajectory.retrieved.extend(
            RetrievedPassage(pid=hit.pid, title=hit.title, text=hit.text, score=hit.score, query=query,
                             round=round, step=step)
            for hit in hits
        )
    return results


def format_passages(passages: Iterable[SearchHit | RetrievedPassage], max_chars: int = 300) -> str:
    """Numbered ``[i] Title: text`` lines, each text cut at ``max_chars``; a clear line when empty."""
    lines = []
    for i, passage in enumerate(passages, start=1):
        text = passage.text if len(passage.text) <= max_chars else passage.text[:max_chars].rsplit(" ", 1)[0] + " ..."
        lines.append(f"[{i}] {passage.title}: {text}")
    return "\n".join(lines) if lines else "(no passages found)"


def fuse(result_lists: Sequence[Sequence[SearchHit | RetrievedPassage]], limit: int,
         rrf_k: int = 60) -> list[SearchHit | RetrievedPassage]:
    """Merge ranked lists by reciprocal rank fusion, one entry per passage id, best first."""
    scores: dict[str, float] = {}
    first: dict[str, SearchHit | RetrievedPassage] = {}
    for hits in result_lists:
        for rank, hit in enumerate(hits, start=1):
            scores[hit.pid] = scores.get(hit.pid, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(hit.pid, hit)
    ranked = sorted(scores, key=lambda pid: -scores[pid])  # sorted() is stable: ties keep first-seen order
    return [first[pid] for pid in ranked[:limit]]


def evidence_pool(trajectory: Trajectory, limit: int) -> list[RetrievedPassage]:
    """The best ``limit`` distinct passages retrieved so far, fused over every query issued."""
    by_query: dict[tuple[str, int, int | None], list[RetrievedPassage]] = {}
    for passage in trajectory.retrieved:
        by_query.setdefault((passage.query, passage.round, passage.step), []).append(passage)
    return fuse(list(by_query.values()), limit)  # type: ignore[return-value]


def clean_query(text: str | None, fallback: str, anchor: str | None = None) -> str:
    """A usable search query from an LM's output: first line, no labels, quotes or placeholders.

    Small models often write a lead-in ("The search query is:") or drift off topic; a line that ends in a
    colon, has fewer than two words, or shares no content word with ``anchor`` (default: ``fallback``)
    is replaced by ``fallback``.
    """
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:search\s+)?query\s*:\s*", "", line, flags=re.IGNORECASE)
    line = _without_placeholders(line).strip("\"'`*").strip()
    anchor_words = content_words(fallback if anchor is None else anchor)
    if (len(re.findall(r"[^\W_]+", line)) < 2 or line.endswith(":")
            or (anchor_words and not content_words(line) & anchor_words)):
        line = _without_placeholders(fallback)
    return line[:MAX_QUERY_CHARS]


_STOP = frozenset("""a an the of in on at to for from by with and or but is are was were be been being what which who
whom whose when where why how that this these those it its as do does did has have had not no yes than then
answer question search query find information about""".split())


def content_words(text: str) -> set[str]:
    """Lower-cased words of three letters or more that are not stop words."""
    return {w for w in re.findall(r"[^\W_]{3,}", text.lower())} - _STOP


def _without_placeholders(text: str) -> str:
    return " ".join(re.sub(rf"\s*{PLACEHOLDER.pattern}", "", text).split())


def is_non_answer(text: str | None) -> bool:
    """Whether an answer says nothing ("unknown", "not mentioned", empty ...)."""
    return (text or "").strip().strip(".!").lower() in _NON_ANSWERS


_LEAD_IN = re.compile(
    r"^(?:the\s+)?(?:final\s+|short\s+)?answer\b(?:\s+to\s+(?:this|the)\s+question)?\s*(?:is\b)?\s*:?\s*",
    re.IGNORECASE)


def strip_echo(answer: str) -> str:
    """Drop what a small model writes around an answer: a passage marker copied from the prompt
    (``[2] Title: ...``) and a lead-in (``The answer to the question is: ...``), which may leave nothing."""
    answer = re.sub(r"^\[\d+\]\s*", "", answer).strip()
    return _LEAD_IN.sub("", answer, count=1).strip()


def parse_yes_no(text: str | None) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when the text is neither."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    if not words:
        return None
    if words[0] in {"yes", "true", "y", "enough", "sufficient"}:
        return True
    if words[0] in {"no", "false", "n", "not", "insufficient"}:
        return False
    return None
