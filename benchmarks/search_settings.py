"""Recall and latency of one ColBERT index under several PLAID search settings.

PLAID first picks candidate documents through the centroids nearest each query token (``ncells``,
``centroid_score_threshold``, ``ndocs``) and only scores those exactly. Narrower settings are faster;
if recall holds as they narrow, the extra candidates were not needed; if it rises as they widen
towards exhaustive, candidate generation was losing gold passages. The retriever's default settings
(:func:`apexdsp.indexes.colbert_retriever.search_settings`) are marked. Choose on questions the encoder
never trained on (``--heldout-of ENCODER`` with a training file), then confirm on dev.

    .venv/bin/python benchmarks/search_settings.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/train.jsonl --heldout-of ENCODER --out settings.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from apexdsp.paths import configure_environment

configure_environment()

GRID = [
    {"ncells": 1, "centroid_score_threshold": 0.5, "ndocs": 256},
    {"ncells": 1, "centroid_score_threshold": 0.45, "ndocs": 512},
    {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 256},
    {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 512},
    {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024},
    {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": 4096},
    {"ncells": 16, "centroid_score_threshold": 0.0, "ndocs": 16384},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--heldout-of", help="an encoder folder: only the questions it held out of training")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    import torch

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes.colbert_retriever import ColBERTRetriever, search_settings
    from apexdsp.indexes.evaluation import heldout_ids
    from apexdsp.metrics.retrieval import all_gold_at_k, supporting_title_recall

    torch.set_num_threads(args.threads)
    keep = heldout_ids(args.heldout_of, args.questions) if args.heldout_of else None
    questions = [q for q in read_questions(args.questions)
                 if q.supporting_titles and (keep is None or q.id in keep)]
    retriever = ColBERTRetriever(args.index)
    retriever.search("warm-up query", k=10)
    default = search_settings(10)
    encode_ms = []
    for question in questions:  # the query encoder's share of a search, whatever the settings
        started = time.perf_counter()
        retriever.encode([question.question])
        encode_ms.append((time.perf_counter() - started) * 1000)
    print(json.dumps({"query_encoding_ms_p50": round(statistics.median(encode_ms), 1)}), flush=True)
    rows = []
    for settings in GRID:
        retriever.settings = settings
        latencies, recall5, all_gold10 = [], [], []
        for question in questions:
            started = time.perf_counter()
            hits = retriever.search(question.question, k=10)
            latencies.append((time.perf_counter() - started) * 1000)
            titles = [hit.title for hit in hits]
            recall5.append(supporting_title_recall(question.supporting_titles, titles, 5))
            all_gold10.append(all_gold_at_k(question.supporting_titles, titles, 10))
        row = {**settings, "default": settings == default, "n": len(questions),
               "recall_at_5": round(statistics.fmean(recall5), 4),
               "all_gold_at_10": round(statistics.fmean(all_gold10), 4),
               "latency_ms_p50": round(statistics.median(latencies), 1),
               "latency_ms_p95": round(statistics.quantiles(latencies, n=20)[-1], 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"index": args.index, "questions": args.questions,
                                              "heldout_of": args.heldout_of, "rows": rows,
                                              "query_encoding_ms_p50": round(statistics.median(encode_ms), 1)},
                                             indent=2))


if __name__ == "__main__":
    main()
