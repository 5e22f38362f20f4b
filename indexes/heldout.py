"""A held-out slice of the training questions and an open-pool proxy of the full retrieval evaluation.

Building a PLAID index over the 15k-paragraph HotpotQA corpus takes a quarter of an hour on two cores,
far too slow to compare encoder variants or to pick a checkpoint during training. The proxy ranks, by
exhaustive scoring, a pool of corpus passages: every paragraph of the held-out questions (their gold
paragraphs and the distractors the benchmark picked to resemble them) plus a few thousand random
corpus passages, so that it is an open search, not a choice among ten. It reports the same
supporting-title recall@k and all-gold@k as ``apexdsp index eval``.

The held-out questions are chosen by a hash of their text, so the slice does not depend on which other
files are trained on, and it is never trained on: encoders are selected on it, never on dev.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from apexdsp.data.records import Question
from apexdsp.indexes.corpus import Corpus, passage_text
from apexdsp.metrics.retrieval import all_gold_at_k, supporting_title_recall

PROXY_KS = (1, 2, 5, 10, 20)


def heldout_rank(question_text: str, seed: int = 0) -> str:
    """The sort key that picks held-out questions: a seeded hash of the (stripped) question text."""
    return hashlib.sha1(f"{seed}:{question_text.strip()}".encode()).hexdigest()


def heldout_split(questions: Sequence[Question], n: int, seed: int = 0) -> tuple[list[Question], list[Question]]:
    """``(train, heldout)``: the ``n`` questions with the smallest seeded hash of their text are held out
    (the same slice as the encoder trainer's ``split_heldout``)."""
    held = {q.id for q in sorted(questions, key=lambda q: heldout_rank(q.question, seed))[:n]}
    return [q for q in questions if q.id not in held], [q for q in questions if q.id in held]


@dataclass
class OpenPool:
    """Corpus passages searched by the proxy (pids into the corpus) and the questions that search them."""

    corpus: Corpus
    pids: list[int]
    questions: list[Question]

    def texts(self) -> list[str]:
        return [passage_text(self.corpus[p].title, self.corpus[p].text) for p in self.pids]

    def titles(self) -> list[str]:
        return [self.corpus[p].title for p in self.pids]


def build_open_pool(questions: Sequence[Question], corpus: Corpus, random_passages: int = 3000,
                    seed: int = 0) -> OpenPool:
    """The questions' own paragraphs found in ``corpus`` plus ``random_passages`` other corpus passages."""
    by_text = {passage_text(p.title, p.text): pid for pid, p in enumerate(corpus.passages)}
    own = []
    for question in questions:
        for paragraph in question.paragraphs:
            pid = by_text.get(passage_text(paragraph.title, paragraph.text))
            if pid is not None:
                own.append(pid)
    own = list(dict.fromkeys(own))
    taken = set(own)
    rest = [pid for pid in range(len(corpus)) if pid not in taken]
    extra = random.Random(seed).sample(rest, min(random_passages, len(rest)))
    return OpenPool(corpus=corpus, pids=sorted(own + extra), questions=list(questions))


def pool_metrics(scores: np.ndarray, pool: OpenPool, ks: Sequence[int] = PROXY_KS) -> dict[str, float]:
    """recall@k / all-gold@k from a ``(questions, pool)`` score matrix, as ``apexdsp index eval`` computes them."""
    titles = pool.titles()
    depth = max(ks)
    metrics = {f"recall@{k}": 0.0 for k in ks} | {f"all_gold@{k}": 0.0 for k in ks}
    for row, question in zip(scores, pool.questions):
        top = np.argsort(-row, kind="stable")[:depth]
        ranked = [titles[i] for i in top]
        for k in ks:
            metrics[f"recall@{k}"] += supporting_title_recall(question.supporting_titles, ranked, k)
            metrics[f"all_gold@{k}"] += all_gold_at_k(question.supporting_titles, ranked, k)
    return {name: value / len(pool.questions) for name, value in metrics.items()}


def maxsim_matrix(queries: "torch.Tensor", docs: "torch.Tensor", doc_mask: "torch.Tensor",
                  chunk: int = 16) -> np.ndarray:
    """Exhaustive late-interaction scores ``(q, n)``: for each query token its best doc token, summed.

    Memory traffic, not arithmetic, is the cost (a ``(query tokens, doc tokens)`` block per pair), so the
    docs are taken shortest first in small chunks, each cut to its longest doc, and the padding mask
    rides in the product as an extra dimension (query 1, doc 0 or -1e4) instead of a pass of its own.
    """
    import torch

    n_queries, query_len, dim = queries.shape
    flat = torch.cat([queries.reshape(n_queries * query_len, dim).float(),
                      torch.ones(n_queries * query_len, 1)], dim=1)
    lengths = doc_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(n_queries, docs.shape[0])
    with torch.inference_mode():
        for start in range(0, docs.shape[0], chunk):
            picked = order[start:start + chunk]
            width = max(1, int(lengths[picked].max()))
            block = torch.cat([docs[picked, :width].float(), (~doc_mask[picked, :width])[..., None] * -1e4], dim=-1)
            sim = (flat @ block.reshape(len(picked) * width, dim + 1).T).view(n_queries, query_len, len(picked), width)
            out[:, picked] = sim.amax(-1).sum(1)
    return out.numpy()


def colbert_pool_scores(encoder_dir, pool: OpenPool, batch_size: int = 32,
                        progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Exact MaxSim of a saved ColBERT encoder (no PLAID compression) over the pool."""
    import torch

    from apexdsp.indexes.encoder import load_checkpoint

    checkpoint = load_checkpoint(encoder_dir)
    texts = pool.texts()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    maxlen = checkpoint.colbert_config.doc_maxlen
    docs = torch.zeros(len(texts), maxlen, checkpoint.colbert_config.dim)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            vectors = checkpoint.docFromText([texts[i] for i in batch], bsize=batch_size, keep_dims=True)[0]
            docs[batch, :vectors.shape[1]] = vectors.float()
            if progress is not None:
                progress(len(batch))
        queries = checkpoint.queryFromText([q.question for q in pool.questions], bsize=64).float()
    return maxsim_matrix(queries, docs, docs.norm(dim=-1) > 0)


def dense_pool_scores(pool: OpenPool, corpus_embeddings: np.ndarray, encoder) -> np.ndarray:
    """Mean-pooled MiniLM cosine (the dense baseline) over the pool."""
    return encoder.encode([q.question for q in pool.questions]) @ corpus_embeddings[pool.pids].T


def bm25_pool_scores(pool: OpenPool) -> np.ndarray:
    """BM25 (the lexical baseline, same tokenizer) over the pool alone."""
    from apexdsp.indexes.baselines import BM25Retriever

    sub = Corpus(passages=[pool.corpus[p] for p in pool.pids])
    retriever = BM25Retriever(sub)
    scores = np.zeros((len(pool.questions), len(pool.pids)), dtype=np.float32)
    for row, ranked in enumerate(retriever._search_pids([q.question for q in pool.questions], 50)):
        for rank, (pid, _) in enumerate(ranked):
            scores[row, pid] = 100.0 - rank
    return scores
