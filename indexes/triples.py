"""Training examples for the ColBERT encoder: a question, its gold paragraphs, and hard negatives.

Hard negatives come from up to three pools, because each teaches something different:

* ``distractors``: the question's own distractor paragraphs (the benchmark picked them to look
  relevant: same entities, same topic);
* ``bm25``: paragraphs that BM25 ranks high for the question in the corpus but that are not gold (what a
  lexical first stage confuses);
* ``colbert``: paragraphs that an earlier ColBERT index ranks high but that are not gold (what the
  encoder itself confuses in the open corpus: ColBERTv2's second training round, without distillation).

Gold is decided by title (normalised), so a mined paragraph of a gold page is never used as a negative.

Questions are few (about 1,900 across the three benchmarks), so a corpus can also supply *self-supervised*
examples (:func:`self_supervised_examples`): a passage's title, or one of its sentences taken out of it,
is the query for that passage, with BM25-mined negatives. Titles teach what a multi-hop question needs
most (find the page of an entity it names); sentences teach matching a statement to its context (the
inverse cloze task of Lee et al., 2019).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Question
from apexdsp.errors import DataError
from apexdsp.indexes.corpus import load_corpus, passage_text
from apexdsp.metrics.retrieval import normalize_title


@dataclass(frozen=True)
class TrainPassage:
    """A passage as the encoder sees it (``title | text``), with its title for gold checks."""

    title: str
    text: str

    @property
    def encoded_text(self) -> str:
        return passage_text(self.title, self.text)


@dataclass
class TrainingExample:
    """One question with its positives (gold paragraphs) and hard negatives, by pool."""

    question: str
    gold_titles: frozenset[str]  # normalised
    positives: list[TrainPassage]
    pools: dict[str, list[TrainPassage]] = field(default_factory=dict)
    source: str = ""  # the training file it came from (for self-supervised examples, the corpus)
    qid: str = ""  # the question's id in its file ("" for self-supervised examples)
    self_supervised: bool = False

    @property
    def negatives(self) -> list[TrainPassage]:
        return [passage for pool in self.pools.values() for passage in pool]


def default_corpus_for(train_file: str | os.PathLike[str]) -> Path | None:
    """The shared data layout keeps ``corpus.jsonl`` beside each benchmark's question files."""
    candidate = Path(train_file).with_name("corpus.jsonl")
    return candidate if candidate.is_file() else None


def example_from_question(question: Question, distractors_per_question: int) -> TrainingExample | None:
    """Positives and distractors from the question's own paragraphs; ``None`` if it has no gold paragraph."""
    gold = frozenset(normalize_title(t) for t in question.supporting_titles if t.strip())
    positives, distractors = [], []
    for paragraph in question.paragraphs:
        if not paragraph.text.strip():
            continue
        item = TrainPassage(paragraph.title, paragraph.text)
        if paragraph.is_supporting or normalize_title(paragraph.title) in gold:
            if item not in positives:
                positives.append(item)
        elif item not in distractors:
            distractors.append(item)
    if not positives:
        return None
    gold_titles = gold or frozenset(normalize_title(p.title) for p in positives)
    return TrainingExample(question.question.strip(), gold_titles, positives,
                           {"distractors": distractors[:distractors_per_question]}, qid=question.id)


# After a lowercase letter, digit or bracket and a full stop, with or without a space (some corpora lost theirs).
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s*(?=[A-Z])")


def self_supervised_examples(corpus, n: int, seed: int = 0, exclude_titles: frozenset[str] = frozenset(),
                             source: str = "") -> list[TrainingExample]:
    """``n`` query/passage pairs drawn from ``corpus`` alone, alternating two kinds of query.

    * the passage's title (its text stays whole): find the page of a named entity;
    * one sentence (not the first) of a passage of two or more sentences, taken out of the passage (the positive is the
      title and the remaining sentences): match a statement to its context.

    Passages whose (normalised) title is in ``exclude_titles`` are never drawn, so the gold paragraphs of
    questions kept out of training stay unseen. Negatives are mined by the caller (BM25).
    """
    if n <= 0:
        return []
    rng = random.Random(seed)
    order = list(range(len(corpus)))
    rng.shuffle(order)
    examples: list[TrainingExample] = []
    used_titles: set[str] = set()
    for pid in order:
        if len(examples) >= n:
            break
        passage = corpus[pid]
        title = normalize_title(passage.title)
        if not title or title in exclude_titles or title in used_titles:
            continue
        sentences = [s for s in _SENTENCE_END.split(passage.text.strip()) if s.strip()]
        if len(examples) % 2 == 0 or len(sentences) < 2:
            query, kept = passage.title.strip(), passage.text
        else:
            taken = rng.randrange(1, len(sentences))  # never the first: it names the title's entity
            query, kept = sentences[taken].strip(), " ".join(sentences[:taken] + sentences[taken + 1:])
        if len(query.split()) < 1 or not kept.strip():
            continue
        used_titles.add(title)
        examples.append(TrainingExample(query, frozenset({title}), [TrainPassage(passage.title, kept)], {},
                                        source=source, self_supervised=True))
    return examples


def mine_negatives(examples: list[TrainingExample], retriever, per_question: int, pool: str, depth: int = 30) -> None:
    """Add up to ``per_question`` top-ranked non-gold paragraphs from ``retriever`` to pool ``pool`` (in place)."""
    if per_question <= 0 or not examples:
        return
    ranked = retriever.search_batch([example.question for example in examples], k=depth)
    for example, hits in zip(examples, ranked):
        seen = {p.encoded_text for p in [*example.positives, *example.negatives]}
        mined = example.pools.setdefault(pool, [])
        for hit in hits:
            if len(mined) >= per_question:
                break
            candidate = TrainPassage(hit.title, hit.text)
            if normalize_title(hit.title) in example.gold_titles or candidate.encoded_text in seen:
                continue
            seen.add(candidate.encoded_text)
            mined.append(candidate)


def build_examples(
    train_files: list[str | os.PathLike[str]],
    corpora: dict[str, str | os.PathLike[str] | None] | None = None,
    distractors_per_question: int = 4,
    mined_per_question: int = 2,
    limit_per_file: int | list[int | None] | None = None,
    mining_index: str | os.PathLike[str] | None = None,
    index_mined_per_question: int = 0,
    self_supervised_per_corpus: int = 0,
    seed: int = 0,
) -> list[TrainingExample]:
    """Examples from every training file, in file order; mined negatives come from each file's corpus.

    ``limit_per_file`` keeps the first N questions of every file, or of each file when it is a list.
    ``self_supervised_per_corpus`` adds that many :func:`self_supervised_examples` from each file's corpus
    (never from a gold page of that file's questions), after the file's own questions.

    ``corpora`` maps a training file to its corpus (default: ``corpus.jsonl`` beside it; ``None``: no
    mining for that file). ``mining_index`` is a ColBERT index whose top hits become the ``colbert``
    pool, for the files whose corpus is the one that index was built from.
    """
    from apexdsp.indexes.baselines import BM25Retriever

    index_retriever = None
    if mining_index is not None and index_mined_per_question > 0:
        from apexdsp.indexes.colbert_retriever import ColBERTRetriever

        index_retriever = ColBERTRetriever(mining_index)
    corpora = corpora or {}
    examples: list[TrainingExample] = []
    limits = limit_per_file if isinstance(limit_per_file, list) else [limit_per_file] * len(train_files)
    for train_file, limit in zip(train_files, limits, strict=True):
        questions = read_questions(train_file, limit=limit)
        if not questions:
            raise DataError(f"{os.fspath(train_file)}: no training questions")
        file_examples = [e for e in (example_from_question(q, distractors_per_question) for q in questions) if e]
        for example in file_examples:
            example.source = os.fspath(train_file)
        if not file_examples:
            raise DataError(f"{os.fspath(train_file)}: no question has a supporting paragraph to train on")
        corpus_path = corpora.get(os.fspath(train_file), default_corpus_for(train_file))
        if corpus_path is not None and (mined_per_question > 0 or self_supervised_per_corpus > 0):
            corpus = load_corpus(corpus_path)
            bm25 = BM25Retriever(corpus)
            if mined_per_question > 0:
                mine_negatives(file_examples, bm25, mined_per_question, "bm25")
            if index_retriever is not None and index_retriever.manifest.corpus_sha256 == corpus.sha256:
                mine_negatives(file_examples, index_retriever, index_mined_per_question, "colbert")
            gold = frozenset(normalize_title(t) for q in questions for t in q.supporting_titles)
            pairs = self_supervised_examples(corpus, self_supervised_per_corpus, seed, gold, os.fspath(corpus_path))
            mine_negatives(pairs, bm25, max(1, mined_per_question), "bm25")
            file_examples.extend(pairs)
        elif self_supervised_per_corpus > 0:
            raise DataError(f"{os.fspath(train_file)}: self-supervised pairs need its corpus "
                            "(corpus.jsonl beside it, or --mining-corpus)")
        examples.extend(file_examples)
    return examples
