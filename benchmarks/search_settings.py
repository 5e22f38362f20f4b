"""Recall@k of one ColBERT index under wider PLAID search settings: is the search or the encoder the limit?

PLAID first picks candidate documents through the centroids nearest each query token (``ncells``,
``centroid_score_threshold``, ``ndocs``) and only scores those exactly. If recall rises as the settings
widen towards exhaustive, candidate generation was losing gold passages; if it does not, the encoder is
what limits recall. The retriever's own settings (:func:`apexdsp.indexes.colbert_retriever.search_settings`)
are the first row.

    .venv/bin/python benchmarks/search_settings.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/dev.jsonl -k 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from unittest import mock

from apexdsp.paths import configure_environment

configure_environment()

WIDER = [
    {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": 4096},
    {"ncells": 8, "centroid_score_threshold": 0.3, "ndocs": 8192},
    {"ncells": 16, "centroid_score_threshold": 0.0, "ndocs": 16384},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("-k", type=int, default=5)
    args = parser.parse_args()

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes import colbert_retriever, load_retriever
    from apexdsp.metrics.retrieval import supporting_title_recall

    questions = [q for q in read_questions(args.questions) if q.supporting_titles]
    retriever = load_retriever(args.index)
    for settings in [colbert_retriever.search_settings(args.k), *WIDER]:
        with mock.patch.object(colbert_retriever, "search_settings", lambda k, s=settings: s):
            recall = [supporting_title_recall(q.supporting_titles,
                                              [hit.title for hit in retriever.search(q.question, k=args.k)])
                      for q in questions]
        print(json.dumps({**settings, "k": args.k, "n": len(questions),
                          f"recall_at_{args.k}": round(statistics.fmean(recall), 4)}), flush=True)


if __name__ == "__main__":
    main()
