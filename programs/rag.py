"""Retrieve-then-read baseline: search the index with the question, answer from the top-k passages."""

from __future__ import annotations

from typing import Any

from apexdsp.indexes.base import Retriever
from apexdsp.programs.answer import PassageReader
from apexdsp.programs.base import QAProgram
from apexdsp.programs.config import RagConfig
from apexdsp.programs.evidence import search
from apexdsp.programs.shared import Shared
from apexdsp.programs.trajectory import Trajectory


class Rag(QAProgram):
    """``question -> search(question, k) -> answer``: one search, one LM call."""

    name = "rag"

    def __init__(self, retriever: Retriever, config: RagConfig | None = None, **options: Any):
        super().__init__()
        self.config = config or RagConfig(**options)
        self._retriever = Shared(retriever)  # copies of the program search the same index
        self.reader = PassageReader(self.config.passage_chars, self.config.answer_tokens)

    @property
    def retriever(self) -> Retriever:
        return self._retriever.value

    def run(self, question: str, trajectory: Trajectory) -> str:
        hits = search(self.retriever, question, self.config.k, trajectory)
        trajectory.rounds = 1
        return self.reader(question=question, passages=hits).answer
