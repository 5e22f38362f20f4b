"""Choose the hybrid retriever's fusion: ColBERT's weight against BM25's, and the rank constant.

Each question is searched once by ColBERT and once by BM25 (``depth`` deep); every fusion of the grid
is then computed from those two rankings with the hybrid retriever's own fusion
(:func:`apexdsp.indexes.hybrid.fuse_rankings`), so the grid costs one search per retriever. Choose on
questions the encoder never trained on (``--heldout-of ENCODER`` with a training file); each row gives
recall@5 and all-gold@10 per question file and their mean recall@5.

    .venv/bin/python benchmarks/hybrid_weights.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/train.jsonl --heldout-of ENCODER --out hybrid.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from apexdsp.paths import configure_environment

configure_environment()

COLBERT_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0, 5.0)
RRF_KS = (10, 30, 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, action="append", help="repeat: one index per question file")
    parser.add_argument("--questions", required=True, action="append")
    parser.add_argument("--heldout-of", help="an encoder folder: only the questions it held out of training")
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if len(args.index) != len(args.questions):
        parser.error("give one --index per --questions")

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.colbert_retriever import ColBERTRetriever
    from apexdsp.indexes.evaluation import heldout_ids
    from apexdsp.indexes.hybrid import fuse_rankings
    from apexdsp.indexes.corpus import read_passage_table
    from apexdsp.metrics.retrieval import all_gold_at_k, supporting_title_recall

    sets = []  # per question file: (name, questions, colbert rankings, bm25 rankings)
    for index, questions_path in zip(args.index, args.questions):
        keep = heldout_ids(args.heldout_of, questions_path) if args.heldout_of else None
        questions = [q for q in read_questions(questions_path)
                     if q.supporting_titles and (keep is None or q.id in keep)]
        colbert = ColBERTRetriever(index)
        bm25 = BM25Retriever(read_passage_table(Path(index)))  # as the hybrid searcher builds it
        texts = [q.question for q in questions]
        sets.append((Path(questions_path).parent.name, questions,
                     colbert.search_batch(texts, k=args.depth), bm25.search_batch(texts, k=args.depth)))

    rows = []
    for rrf_k in RRF_KS:
        for weight in COLBERT_WEIGHTS:
            row = {"colbert_weight": weight, "bm25_weight": 1.0, "rrf_k": rrf_k}
            macro = []
            for name, questions, colbert_hits, bm25_hits in sets:
                recall5, gold10 = [], []
                for question, a, b in zip(questions, colbert_hits, bm25_hits):
                    titles = [hit.title for hit in fuse_rankings([a, b], [weight, 1.0], 10, rrf_k)]
                    recall5.append(supporting_title_recall(question.supporting_titles, titles, 5))
                    gold10.append(all_gold_at_k(question.supporting_titles, titles, 10))
                row[f"{name}.recall_at_5"] = round(statistics.fmean(recall5), 4)
                row[f"{name}.all_gold_at_10"] = round(statistics.fmean(gold10), 4)
                row[f"{name}.n"] = len(questions)
                macro.append(row[f"{name}.recall_at_5"])
            row["mean_recall_at_5"] = round(statistics.fmean(macro), 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name, questions, colbert_hits, bm25_hits in sets:  # each alone, for reference
        for label, hits in (("colbert", colbert_hits), ("bm25", bm25_hits)):
            recall5 = statistics.fmean(supporting_title_recall(q.supporting_titles, [h.title for h in r], 5)
                                       for q, r in zip(questions, hits))
            print(json.dumps({"alone": label, "set": name, "recall_at_5": round(recall5, 4)}))
    if args.out:
        Path(args.out).write_text(json.dumps({"indexes": args.index, "questions": args.questions,
                                              "heldout_of": args.heldout_of, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
