"""Soft targets for encoder training: a dense MiniLM (+ BM25) teacher scored over each batch's candidates.

Why: cross-entropy on the gold paragraph alone, over the ~1.5k training questions there are, memorises
them within a few epochs (training loss near zero, held-out train questions at recall 1.0) and wears
away the pretrained model's general sense of relevance: the first trained encoder ranked *below* plain
mean-pooled MiniLM in the open corpus. ColBERTv2 avoids this by distilling a cross-encoder's scores over
each query's candidates. No cross-encoder can be had offline, so the teacher here is what is: the
pretrained MiniLM's cosine (the student's own starting point, so the KL term anchors it there) and,
optionally, BM25 (exact-match evidence the two-stage MiniLM teacher lacks; a fusion of the two ranks
better than either on the held-out slice). Fusion is used only to make training targets, never at
search time.

Teacher scores are precomputed for every (training question, cached passage) pair once, so a step only
gathers a ``(questions, candidates)`` block: each signal is standardised over the candidates of its
row, the two are summed, and divided by a temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TeacherConfig:
    """How the teacher's logits are formed (``bm25_weight`` 0: dense MiniLM alone)."""

    bm25_weight: float = 1.0
    temperature: float = 0.5


class Teacher:
    """Precomputed teacher scores; :meth:`logits` gives the block for one batch."""

    def __init__(self, questions: Sequence[str], passages: Sequence[str], config: TeacherConfig | None = None,
                 known_embeddings: dict[str, np.ndarray] | None = None, progress: bool = False):
        from apexdsp.indexes.baselines import MiniLMEncoder

        self.config = config or TeacherConfig()
        self.row = {question: i for i, question in enumerate(questions)}
        encoder = MiniLMEncoder()
        known = known_embeddings or {}
        missing = [text for text in dict.fromkeys(passages) if text not in known]
        if missing:  # passages not in a corpus whose dense vectors are cached
            # thousands of passages on the specs' recipes: minutes on 2 cores, so it shows a bar
            known = {**known, **dict(zip(missing, encoder.encode(missing, progress=progress)))}
        passage_vectors = np.stack([known[text] for text in passages])
        question_vectors = encoder.encode(list(questions))
        self.dense = torch.from_numpy(question_vectors @ passage_vectors.T).to(torch.float16)
        self.bm25 = self._bm25(questions, passages) if self.config.bm25_weight > 0 else None

    @staticmethod
    def _bm25(questions: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """BM25 of every question against the cached passages (same tokenizer as the BM25 baseline)."""
        import bm25s

        tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        index = bm25s.BM25()
        index.index(tokenizer.tokenize(list(passages), return_as="tuple", show_progress=False), show_progress=False)
        tokens = tokenizer.tokenize(list(questions), update_vocab=False, return_as="string", show_progress=False)
        return torch.from_numpy(np.stack([index.get_scores(t) for t in tokens]).astype(np.float16))

    def logits(self, questions: Sequence[str], docs: Sequence[int], excluded: torch.Tensor) -> torch.Tensor:
        """``(questions, docs)`` teacher logits; ``excluded`` cells (other gold passages) get -1e4."""
        rows = torch.tensor([self.row[q] for q in questions])
        cols = torch.tensor(list(docs))
        total = _standardise(self.dense[rows][:, cols].float(), excluded)
        if self.bm25 is not None:
            total = total + self.config.bm25_weight * _standardise(self.bm25[rows][:, cols].float(), excluded)
        return (total / self.config.temperature).masked_fill(excluded, -1e4)


def _standardise(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """Per row: zero mean, unit variance over the cells that are not excluded."""
    keep = (~excluded).float()
    count = keep.sum(1, keepdim=True).clamp(min=1)
    mean = (scores * keep).sum(1, keepdim=True) / count
    var = (((scores - mean) ** 2) * keep).sum(1, keepdim=True) / count
    return (scores - mean) / var.sqrt().clamp(min=1e-6)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over each row's candidates, averaged over rows (ColBERTv2's distillation)."""
    return torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      reduction="batchmean", log_target=True)


def corpus_embeddings(corpus_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Dense MiniLM vectors by passage text of the corpora the dense baseline has already encoded.

    A corpus not encoded yet is skipped, not encoded: the teacher encodes just the passages it trains on,
    a few hundred in a short run, where a whole corpus is tens of thousands (minutes on a CPU).
    """
    from apexdsp.indexes.baselines import DenseRetriever
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.paths import cache_dir

    known: dict[str, np.ndarray] = {}
    for path in dict.fromkeys(corpus_paths):
        corpus = load_corpus(path)
        dense = DenseRetriever.cached(corpus, cache_dir("baselines"))
        if dense is not None:
            known.update(zip(corpus.texts(), dense.embeddings))
    return known
