"""Proxy of ``apexdsp index eval`` for comparing ColBERT encoders in minutes instead of a full index build.

Exhaustive, uncompressed MaxSim of each encoder over an open pool (held-out HotpotQA *train* questions'
paragraphs + random corpus passages; see :mod:`apexdsp.indexes.heldout`), side by side with BM25 and
dense MiniLM on the same pool. Usage::

    python benchmarks/encoder_proxy.py .apexdsp/encoders/a .apexdsp/encoders/b [--heldout 300 --random 3000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from apexdsp.paths import cache_dir, configure_environment, shared_data_dir

configure_environment()

import torch  # noqa: E402

from apexdsp.data.loaders import read_questions  # noqa: E402
from apexdsp.indexes import heldout  # noqa: E402
from apexdsp.indexes.baselines import DenseRetriever  # noqa: E402
from apexdsp.indexes.corpus import load_corpus  # noqa: E402


def _rrf(scores, k: int = 60):
    import numpy as np

    ranks = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
    return 1.0 / (k + 1 + ranks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("encoders", nargs="*")
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--random", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = shared_data_dir() / "hotpotqa"
    _, held = heldout.heldout_split(read_questions(data / "train.jsonl"), args.heldout, args.seed)
    corpus = load_corpus(data / "corpus.jsonl")
    pool = heldout.build_open_pool(held, corpus, args.random, args.seed)
    print(f"pool: {len(held)} held-out train questions, {len(pool.pids)} passages", flush=True)
    results = {}
    if not args.no_baselines:
        bm25 = heldout.bm25_pool_scores(pool)
        results["bm25"] = heldout.pool_metrics(bm25, pool)
        dense_retriever = DenseRetriever.build(corpus, cache_dir("baselines"))
        dense = heldout.dense_pool_scores(pool, dense_retriever.embeddings, dense_retriever.encoder)
        results["dense"] = heldout.pool_metrics(dense, pool)
        for weight in (0.5, 1.0, 2.0):  # what a fused teacher could reach (never used at search time)
            results[f"hybrid-rrf-{weight}"] = heldout.pool_metrics(_rrf(bm25) * weight + _rrf(dense), pool)
    for encoder in args.encoders:
        started = time.perf_counter()
        scores = heldout.colbert_pool_scores(encoder, pool)
        results[encoder] = heldout.pool_metrics(scores, pool) | {"seconds": time.perf_counter() - started}
    for name, metrics in results.items():
        print(f"{name:50s} r@2 {metrics['recall@2']:.3f} r@5 {metrics['recall@5']:.3f} "
              f"r@10 {metrics['recall@10']:.3f} r@20 {metrics['recall@20']:.3f} ag@10 {metrics['all_gold@10']:.3f}"
              + (f"  ({metrics['seconds']:.0f}s)" if "seconds" in metrics else ""), flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
