"""The frozen-generator reward (QAgent, stage 2): are the documents a search agent collected good enough
for a generator it does not control?

QAgent's second stage stops rewarding the agent's own answer, which a policy can improve by learning to
answer instead of learning to search, and instead hands the collected documents to a *frozen*
generator (an LM held fixed; by default the untrained base model) that answers the original question:

    reward = EM(gold, frozen answer) + 0.5 * Hit(gold answer appears in the collected documents)

so the value lies in [0, 1.5]. The Hit term rewards finding the answer even when the small frozen model
fails to extract it. One departure: for a yes/no gold answer Hit is 0, since the word "no" turning up in
some passage says nothing about the evidence.

:func:`frozen_generator_reward` is the pure formula; :class:`FrozenGenerator` is the fixed reader and
:func:`score_trajectory_with_frozen_generator` runs it on a trajectory's documents.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import dspy

from apexdsp.data.records import Question
from apexdsp.metrics import answer_hit, exact_match, normalize_answer
from apexdsp.programs.answer import (AnswerFromPassages, ChooseFromPassages, DecideFromPassages, answer_by_form,
                                    strip_echo)
from apexdsp.programs.base import clean_answer
from apexdsp.programs.evidence import evidence_pool
from apexdsp.programs.trajectory import Trajectory
from apexdsp.rewards.base import RewardResult, register_reward

logger = logging.getLogger(__name__)

HIT_WEIGHT = 0.5
DEFAULT_FROZEN_LM = "smollm2-135m"
_YES_NO = {"yes", "no"}


def frozen_generator_reward(question: Question, documents: Sequence[str] | None,
                            frozen_answer: str | None) -> RewardResult:
    """``EM(gold, frozen_answer) + 0.5 * Hit(gold in documents)``; components ``em`` and ``hit``.

    ``documents`` are every document the trajectory collected (not only those the generator read).
    A ``None`` answer counts as empty; no documents means Hit 0.
    """
    answer = frozen_answer if isinstance(frozen_answer, str) else ""
    texts = [doc for doc in documents or [] if isinstance(doc, str)]
    notes: list[str] = []
    em = exact_match(answer, question.answers)
    if all(normalize_answer(gold) in _YES_NO for gold in question.answers):
        hit = 0.0
        notes.append("hit: not counted for a yes/no answer")
    else:
        hit = answer_hit(question.answers, texts)
    if not texts:
        notes.append("no documents collected")
    if not answer.strip():
        notes.append("no frozen answer")
    return RewardResult(em + HIT_WEIGHT * hit, {"em": em, "hit": hit}, notes)


def format_documents(documents: Sequence[str], max_documents: int, document_chars: int) -> str:
    """The first ``max_documents`` documents as ``[i] text`` lines, each cut at a word before ``document_chars``."""
    lines = []
    for i, document in enumerate(documents[:max_documents], start=1):
        text = " ".join(document.split())
        if len(text) > document_chars:
            text = text[:document_chars].rsplit(" ", 1)[0] + " ..."
        lines.append(f"[{i}] {text}")
    return "\n".join(lines) if lines else "(no passages found)"


class FrozenGenerator(dspy.Module):
    """``(question, documents) -> answer`` with a fixed LM, never optimised.

    The prompt is kept short on purpose, because a 135M model's speed is set by prompt length and its
    accuracy falls on long contexts: at most ``max_documents`` documents (default 5), each cut to
    ``document_chars`` characters (default 300, about 75 tokens), so about 1,500 characters of evidence,
    and at most ``max_tokens`` answer tokens. It uses the same signature as the programs' passage reader
    (and QAgent's plug-and-play frozen reader), yes/no and "X or Y" questions included, and runs under
    ``dspy.context(lm=frozen)`` with the tolerant chat adapter, whatever LM and adapter the caller has configured. The module is marked
    compiled, so optimizers leave its prompt alone.

    ``lm``: a ``dspy.LM``, a model name for :func:`apexdsp.lm.registry.get_lm`, or ``None`` for the
    untrained base model ``smollm2-135m``; a name is loaded on first use.
    """

    def __init__(self, lm: Any = None, *, max_documents: int = 5, document_chars: int = 300,
                 max_tokens: int = 24):
        super().__init__()
        self._frozen_lm = lm if lm is not None else DEFAULT_FROZEN_LM
        self.max_documents = max_documents
        self.document_chars = document_chars
        self.generate = dspy.Predict(AnswerFromPassages, max_tokens=max_tokens)
        self.decide = dspy.Predict(DecideFromPassages, max_tokens=8)  # yes/no questions, as the reader does
        self.choose = dspy.Predict(ChooseFromPassages, max_tokens=8)  # "X or Y" questions, likewise
        self._compiled = True

    @property
    def frozen_lm(self) -> Any:
        """The fixed ``dspy.LM`` (loaded from the registry on first use when given by name)."""
        if isinstance(self._frozen_lm, str):
            from apexdsp.lm.registry import get_lm

            self._frozen_lm = get_lm(self._frozen_lm)
        return self._frozen_lm

    def forward(self, question: str, documents: Sequence[str]) -> dspy.Prediction:
        from apexdsp.lm.adapter import TolerantChatAdapter

        passages = format_documents(list(documents), self.max_documents, self.document_chars)
        with dspy.context(lm=self.frozen_lm, adapter=TolerantChatAdapter()):
            raw = answer_by_form(question, generate=self.generate, decide=self.decide, choose=self.choose,
                                 passages=passages)
        return dspy.Prediction(answer=strip_echo(clean_answer(raw)))


def score_trajectory_with_frozen_generator(question: Question, trajectory: Trajectory,
                                           generator: FrozenGenerator | None = None) -> RewardResult:
    """The frozen-generator reward of a run: ``generator`` answers from the run's best documents.

    The generator reads the ``generator.max_documents`` best distinct passages (fused over every query,
    as QAgent's reader picks them); Hit is measured over all collected documents. Without a
    ``generator``, the answer the run itself recorded (``trajectory.frozen_answer``) is scored. With no
    documents the generator is not asked (an answer from its memory says nothing about the search). A
    failing generator scores as no answer, with a note.
    """
    documents = trajectory.retrieved_texts()
    notes: list[str] = []
    if generator is None:
        answer = trajectory.frozen_answer
        notes.append(f"frozen answer recorded by the run ({trajectory.frozen_generator or 'unknown generator'})")
    elif not documents:
        answer = ""
    else:
        reading = [f"{p.title}: {p.text}" for p in evidence_pool(trajectory, generator.max_documents)]
        try:
            answer = generator(question=question.question, documents=reading).answer
        except Exception as error:  # noqa: BLE001 - one failed generation must not end a training step
            logger.warning("frozen generator failed on %r: %s", question.question[:80], error)
            answer = ""
            notes.append(f"frozen generator failed: {type(error).__name__}: {error}")
    result = frozen_generator_reward(question, documents, answer)
    notes.append(f"frozen answer: {answer!r}")
    return RewardResult(result.value, result.components, notes + result.notes)


@register_reward("frozen_generator")
def frozen_generator_score(question: Question, output: Trajectory, *,
                           generator: FrozenGenerator | None = None) -> RewardResult:
    """Registry entry: :func:`score_trajectory_with_frozen_generator`."""
    if not isinstance(output, Trajectory):
        raise TypeError(f"the frozen-generator reward needs a Trajectory (its documents), got {type(output).__name__}")
    return score_trajectory_with_frozen_generator(question, output, generator)


__all__ = ["FrozenGenerator", "frozen_generator_reward", "frozen_generator_score", "format_documents",
           "score_trajectory_with_frozen_generator"]
