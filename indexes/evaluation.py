"""``apexdsp index eval``: the ColBERT index against BM25, dense MiniLM and ColBERT + BM25 fused by rank
(:mod:`.hybrid`), on the same questions and corpus.

For every retriever, in one run:

* supporting-title recall@k (fraction of gold titles in the top k), all-gold@k (every gold title in the
  top k) and MRR (of the first gold title in the top max(k)), averaged over the questions that have gold
  titles;
* latency as an agent sees it, one query at a time (p50 / p95 over the questions), and the throughput
  of a batched search (queries per second), which is what bulk evaluation gets.

The baselines are built over the corpus recorded in the index manifest (after checking it is still
byte-identical), so all three rank exactly the same passages.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from apexdsp.errors import ApexError
from apexdsp.metrics.retrieval import all_gold_at_k, reciprocal_rank, supporting_title_recall

DEFAULT_KS = (1, 2, 5, 10, 20)


@dataclass
class RetrieverScores:
    """One retriever's figures on one question set."""

    name: str
    n: int
    recall_at: dict[int, float]
    all_gold_at: dict[int, float]
    mrr: float
    latency_ms_p50: float
    latency_ms_p95: float
    batch_queries_per_s: float
    per_question: list[dict] = field(default_factory=list, repr=False)

    def flat_metrics(self) -> dict[str, float]:
        """MLflow-safe metric names: ``colbert.recall_at_5`` ..."""
        metrics = {f"{self.name}.recall_at_{k}": v for k, v in self.recall_at.items()}
        metrics.update({f"{self.name}.all_gold_at_{k}": v for k, v in self.all_gold_at.items()})
        metrics.update({f"{self.name}.mrr": self.mrr, f"{self.name}.latency_ms_p50": self.latency_ms_p50,
                        f"{self.name}.latency_ms_p95": self.latency_ms_p95,
                        f"{self.name}.batch_queries_per_s": self.batch_queries_per_s})
        return metrics


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def score_retriever(retriever, questions: list, ks: tuple[int, ...], batch_size: int = 32,
                    progress: bool = False) -> RetrieverScores:
    """Search every question one at a time (latency, metrics), then in batches (throughput)."""
    depth = max(ks)
    texts = [q.question for q in questions]
    latencies, ranked_titles = [], []
    iterator = texts
    if progress:
        from tqdm import tqdm

        iterator = tqdm(texts, desc=f"{retriever.name}: searching", unit="query")
    for text in iterator:
        started = time.perf_counter()
        hits = retriever.search(text, k=depth)
        latencies.append((time.perf_counter() - started) * 1000)
        ranked_titles.append([hit.title for hit in hits])
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        retriever.search_batch(texts[start:start + batch_size], k=depth)
    throughput = len(texts) / (time.perf_counter() - started)

    per_question = []
    for question, titles in zip(questions, ranked_titles):
        gold = question.supporting_titles
        per_question.append({"id": question.id, "retrieved": titles[:depth],
                             "recall": {k: supporting_title_recall(gold, titles, k) for k in ks},
                             "all_gold": {k: all_gold_at_k(gold, titles, k) for k in ks},
                             "rr": reciprocal_rank(gold, titles, depth)})
    n = len(per_question)
    return RetrieverScores(
        name=retriever.name, n=n,
        recall_at={k: sum(p["recall"][k] for p in per_question) / n for k in ks},
        all_gold_at={k: sum(p["all_gold"][k] for p in per_question) / n for k in ks},
        mrr=sum(p["rr"] for p in per_question) / n,
        latency_ms_p50=_percentile(latencies, 50), latency_ms_p95=_percentile(latencies, 95),
        batch_queries_per_s=throughput, per_question=per_question,
    )


@dataclass
class RetrievalReport:
    index: str
    questions: str
    corpus: str
    ks: list[int]
    n_questions: int
    skipped_without_gold: int
    retrievers: dict[str, RetrieverScores]
    setup_seconds: dict[str, float]
    load_average: list[float]
    index_manifest: dict

    def summary(self) -> dict:
        """The report without per-question detail (what ``--json`` prints)."""
        data = asdict(self)
        for scores in data["retrievers"].values():
            scores.pop("per_question")
        return data


def evaluate_retrieval(index_dir: str | os.PathLike[str], questions_path: str | os.PathLike[str],
                       ks: tuple[int, ...] = DEFAULT_KS, limit: int | None = None, baselines: bool = True,
                       track: bool = True, progress: bool = True, threads: int = 2,
                       heldout_of: str | os.PathLike[str] | None = None) -> RetrievalReport:
    """Evaluate the index (and the baselines over its corpus) on a question file; log it to MLflow.

    ``heldout_of`` (an encoder folder) keeps only the questions that encoder held out of its training
    (the question file must be one of its training files): an evaluation on questions it never saw.
    """
    from apexdsp.paths import cache_dir, configure_environment

    configure_environment()
    import torch

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes.baselines import BM25Retriever, DenseRetriever
    from apexdsp.indexes.colbert_retriever import load_retriever
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.indexes.manifest import IndexManifest

    torch.set_num_threads(threads)
    if not ks or any(k < 1 for k in ks):
        raise ApexError(f"k values must be positive integers, got {list(ks)}")
    ks = tuple(sorted(set(ks)))
    keep = heldout_ids(heldout_of, questions_path) if heldout_of is not None else None
    manifest = IndexManifest.read(index_dir)
    questions = read_questions(questions_path, limit=limit)
    if keep is not None:
        questions = [q for q in questions if q.id in keep]
    if not questions:
        raise ApexError(f"{os.fspath(questions_path)}: no questions")
    usable = [q for q in questions if q.supporting_titles]
    if not usable:
        raise ApexError(f"{os.fspath(questions_path)}: no question has supporting_titles to score retrieval against")

    setup: dict[str, float] = {}
    started = time.perf_counter()
    retrievers = [load_retriever(index_dir)]
    setup["colbert_load_s"] = time.perf_counter() - started
    if baselines:
        if not Path(manifest.corpus_path).is_file():
            raise ApexError(f"corpus {manifest.corpus_path} of index {index_dir} is gone: the baselines need it")
        manifest.check_corpus(index_dir, manifest.corpus_path)
        corpus = load_corpus(manifest.corpus_path)
        started = time.perf_counter()
        retrievers.append(BM25Retriever(corpus))
        setup["bm25_build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        retrievers.append(DenseRetriever.build(corpus, cache_dir("baselines"), progress=progress))
        setup["dense_build_or_load_s"] = time.perf_counter() - started
        from apexdsp.indexes.hybrid import HybridRetriever

        retrievers.append(HybridRetriever([retrievers[0], retrievers[1]]))  # ColBERT + BM25, fused by rank

    scores = {r.name: score_retriever(r, usable, ks, progress=progress) for r in retrievers}
    report = RetrievalReport(
        index=str(Path(index_dir).resolve()), questions=os.fspath(questions_path), corpus=manifest.corpus_path,
        ks=list(ks), n_questions=len(usable), skipped_without_gold=len(questions) - len(usable),
        retrievers=scores, setup_seconds=setup, load_average=[round(x, 2) for x in os.getloadavg()],
        index_manifest=manifest.model_dump(),
    )
    if track:
        _log(report, index_dir, questions_path, manifest.corpus_path)
    return report


def heldout_ids(encoder_dir: str | os.PathLike[str], questions_path: str | os.PathLike[str]) -> set[str]:
    """The ids of the questions of ``questions_path`` that the encoder at ``encoder_dir`` held out of training
    (matched by the file's hash, so the file may have moved)."""
    import json

    from apexdsp.data.loaders import file_sha256
    from apexdsp.indexes.encoder import TRAINING_RECORD

    record_path = Path(encoder_dir) / TRAINING_RECORD
    if not record_path.is_file():
        raise ApexError(f"--heldout-of {os.fspath(encoder_dir)}: no {TRAINING_RECORD} there; give an encoder "
                        "folder written by `apexdsp index train-encoder`")
    record = json.loads(record_path.read_text())
    if "heldout_ids" not in record:
        raise ApexError(f"--heldout-of {os.fspath(encoder_dir)}: the encoder does not record which questions it "
                        "held out (trained by an earlier version); train it again")
    if not Path(questions_path).is_file():
        raise ApexError(f"questions {os.fspath(questions_path)} not found")
    wanted = file_sha256(questions_path)
    by_path = {entry["path"]: entry["sha256"] for role, entry in record.get("data", {}).items()
               if role.startswith("train_")}
    for source, ids in record["heldout_ids"].items():
        if by_path.get(source) == wanted:
            return set(ids)
    trained = ", ".join(Path(path).parent.name + "/" + Path(path).name for path in by_path) or "none"
    raise ApexError(f"--heldout-of {os.fspath(encoder_dir)}: {os.fspath(questions_path)} is not one of its "
                    f"training files (it held out questions of: {trained})")


def _log(report: RetrievalReport, index_dir, questions_path, corpus_path) -> None:
    from apexdsp.tracking import tracked_run

    params = {"job": "index-eval", "index": report.index, "ks": report.ks, "n_questions": report.n_questions,
              "encoder_fingerprint": report.index_manifest["encoder_fingerprint"],
              "nbits": report.index_manifest["nbits"], "retrievers": list(report.retrievers)}
    run_name = f"eval-{Path(index_dir).name}-{Path(questions_path).stem}-{report.n_questions}"
    with tracked_run(experiment="indexes", run_name=run_name, params=params,
                     data_files={"questions": questions_path, "corpus": corpus_path}) as run:
        for scores in report.retrievers.values():
            run.log_metrics(scores.flat_metrics())
        run.log_metrics({"load_average_1m": report.load_average[0], **report.setup_seconds})
        run.log_json(report.summary(), "retrieval_eval.json")
        run.log_json({name: s.per_question for name, s in report.retrievers.items()}, "per_question.json")
