"""Searching a built ColBERT index: the retriever the planner, executor and reflector share.

Loading checks the manifest first (missing, unfinished, or encoder changed since the build: a
one-line :class:`ApexError`), then opens colbert-ai's ``Searcher`` on CPU. :func:`load_retriever`
keeps one loaded retriever per index directory per process, so every module of a program (and every
program in a process) shares the same model and index in memory.

Queries: an empty one is an error; one longer than the encoder's ``query_maxlen`` word pieces is
truncated to it (colbert's behaviour) with a :class:`QueryTruncatedWarning`, so the caller knows the
tail was not searched.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

from apexdsp.errors import ApexError
from apexdsp.indexes.colbert_index import COLBERT_SUBDIR
from apexdsp.indexes.corpus import read_passage_table
from apexdsp.indexes.manifest import IndexManifest
from apexdsp.indexes.retriever_base import CorpusRetriever


class QueryTruncatedWarning(UserWarning):
    """A query had more word pieces than the encoder reads; only its beginning was searched."""


def search_settings(k: int) -> dict:
    """PLAID candidate-generation settings for a depth ``k``.

    colbert picks these on the first search and then keeps them for every later ``k`` (its settings
    are sticky); they are set on every call here instead, and are the same for every ``k`` up to 100,
    so the top 5 of a k=20 search are exactly the hits of a k=5 search (evaluation measures what the
    programs get).
    """
    if k <= 100:
        return {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024}
    return {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(k * 4, 4096)}


class ColBERTRetriever(CorpusRetriever):
    """Top-k passages from a colbert-ai PLAID index, with the corpus ids, titles and texts."""

    name = "colbert"

    def __init__(self, index_dir: str | os.PathLike[str], encoder: str | os.PathLike[str] | None = None,
                 corpus: str | os.PathLike[str] | None = None, verbose: int = 0, settings: dict | None = None):
        #: PLAID candidate-generation settings (``ncells``, ``centroid_score_threshold``, ``ndocs``) used
        #: for every search; ``None``: :func:`search_settings` of the depth asked for.
        self.settings = settings
        self.index_dir = Path(index_dir).expanduser().resolve()
        self.manifest = IndexManifest.read(index_dir)
        encoder_dir = self.manifest.check_encoder(index_dir, encoder)
        if corpus is not None:
            self.manifest.check_corpus(index_dir, corpus)
        colbert_dir = self.index_dir / COLBERT_SUBDIR
        if not (colbert_dir / "metadata.json").is_file():
            raise ApexError(f"index {index_dir} is incomplete ({COLBERT_SUBDIR}/metadata.json missing): rebuild it")
        super().__init__(read_passage_table(self.index_dir))
        if len(self.corpus) != self.manifest.passages:
            raise ApexError(f"index {index_dir}: passage table has {len(self.corpus)} passages, manifest says "
                            f"{self.manifest.passages}: rebuild it")

        from apexdsp.indexes.extensions import load_extensions

        load_extensions()  # under a lock that a killed process cannot leave behind (see extensions.py)
        from colbert import Searcher
        from colbert.infra import Run, RunConfig

        from apexdsp.indexes.encoder import colbert_config, quiet_colbert

        run_config = RunConfig(nranks=1, gpus=0, root=str(self.index_dir / ".colbert-run"))
        with quiet_colbert(), Run().context(run_config):
            self._searcher = Searcher(index=str(colbert_dir), checkpoint=str(encoder_dir),
                                      collection=self.corpus.texts(), config=colbert_config(encoder_dir),
                                      verbose=verbose)
        self.query_maxlen = self._searcher.config.query_maxlen
        self._tokenizer = self._searcher.checkpoint.query_tokenizer.tok
        self._lock = threading.Lock()  # colbert's searcher mutates its config per call; tokenizers are not thread-safe

    def _warn_if_truncated(self, queries: list[str]) -> None:
        # [CLS], [Q] and [SEP] take three of the query_maxlen positions.
        budget = self.query_maxlen - 3
        for query in queries:
            pieces = len(self._tokenizer(query, add_special_tokens=False)["input_ids"])
            if pieces > budget:
                warnings.warn(f"query of {pieces} word pieces truncated to the encoder's {budget}: "
                              f"{query[:60]!r}...", QueryTruncatedWarning, stacklevel=4)

    def encode(self, queries: list[str]):
        """Query embeddings ``(n, query_maxlen, dim)`` for validated queries (one forward pass)."""
        with self._lock:  # a Rust fast tokenizer refuses concurrent use ("Already borrowed")
            self._warn_if_truncated(queries)
            return self._searcher.encode(queries)

    def _search_pids(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        import torch

        with self._lock, torch.inference_mode():  # one query batch at a time: see encode()
            self._warn_if_truncated(queries)
            embeddings = self._searcher.encode(queries)
            self._searcher.configure(**(self.settings or search_settings(k)))
            results = []
            for row in range(len(queries)):
                pids, _, scores = self._searcher.dense_search(embeddings[row:row + 1], k=k)
                results.append([(int(pid), float(score)) for pid, score in zip(pids, scores)])
        return results


_LOADED: dict[tuple, ColBERTRetriever] = {}
_LOADING = threading.Lock()


def load_retriever(index_dir: str | os.PathLike[str]) -> ColBERTRetriever:
    """The retriever for ``index_dir``, loaded once per process and shared by every caller.

    The cache key includes the manifest's build stamp and encoder fingerprint, so an index rebuilt in
    place is loaded afresh rather than served stale.
    """
    manifest = IndexManifest.read(index_dir)
    key = (Path(index_dir).expanduser().resolve(), manifest.created_at, manifest.encoder_fingerprint,
           manifest.corpus_sha256)
    with _LOADING:
        retriever = _LOADED.get(key)
        if retriever is None:
            retriever = ColBERTRetriever(index_dir)
            _LOADED[key] = retriever
        return retriever


def forget_loaded() -> None:
    """Drop the per-process cache (after an index is rebuilt in place)."""
    with _LOADING:
        _LOADED.clear()
