"""The two baselines the ColBERT index is measured against, over the same corpus.

* :class:`BM25Retriever`: lexical BM25 (``bm25s``, English stop words, no stemmer: PyStemmer is not part
  of the pinned stack). Built in memory in seconds, so it is never cached.
* :class:`DenseRetriever`: single-vector all-MiniLM-L6-v2 (mean-pooled, L2-normalised, the way the model
  was trained) with exact inner-product search. Encoding a corpus is the slow part (minutes for 15k
  passages on two cores), so the passage matrix is cached on disk, keyed by the corpus hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from apexdsp.indexes.corpus import Corpus
from apexdsp.indexes.encoder import base_model_path
from apexdsp.indexes.retriever_base import CorpusRetriever


class BM25Retriever(CorpusRetriever):
    """BM25 over ``title | text``. A query sharing no term with the corpus returns no hits."""

    name = "bm25"

    def __init__(self, corpus: Corpus):
        import bm25s

        super().__init__(corpus)
        self._tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        tokens = self._tokenizer.tokenize(corpus.texts(), return_as="tuple", show_progress=False)
        self._bm25 = bm25s.BM25()
        self._bm25.index(tokens, show_progress=False)

    def _search_pids(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        tokens = self._tokenizer.tokenize(queries, update_vocab=False, return_as="string", show_progress=False)
        pids, scores = self._bm25.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        return [[(int(p), float(s)) for p, s in zip(row_p, row_s) if s > 0] for row_p, row_s in zip(pids, scores)]


class MiniLMEncoder:
    """Sentence embeddings from all-MiniLM-L6-v2: mean pooling over tokens, then L2 normalisation."""

    def __init__(self, model_path: str | os.PathLike[str] | None = None, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = Path(model_path or base_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModel.from_pretrained(self.model_path).eval()
        self.max_length = max_length
        self._torch = torch

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """``(len(texts), 384)`` float32 unit vectors; batches are length-sorted to waste little padding."""
        torch = self._torch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="dense: encoding passages", unit="batch")
        with torch.inference_mode():
            for batch in batches:
                encoded = self.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt")
                states = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(states.dtype)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[batch] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


class DenseRetriever(CorpusRetriever):
    """Exact inner-product search over MiniLM passage vectors (a 15k x 384 matrix fits in 23 MB)."""

    name = "dense-minilm"

    def __init__(self, corpus: Corpus, embeddings: np.ndarray, encoder: MiniLMEncoder):
        super().__init__(corpus)
        if embeddings.shape[0] != len(corpus):
            raise ValueError(f"{embeddings.shape[0]} passage vectors for {len(corpus)} passages")
        self.embeddings = embeddings
        self.encoder = encoder

    @staticmethod
    def _cache_file(corpus: Corpus, cache_dir: Path | None) -> Path | None:
        if cache_dir is None or not corpus.sha256:
            return None
        return Path(cache_dir) / f"dense-minilm-{corpus.sha256[:16]}.npy"

    @classmethod
    def cached(cls, corpus: Corpus, cache_dir: Path | None,
               encoder: MiniLMEncoder | None = None) -> DenseRetriever | None:
        """The retriever from vectors this exact corpus was encoded to before, or None (nothing is encoded)."""
        cache = cls._cache_file(corpus, cache_dir)
        if cache is None or not cache.is_file():
            return None
        encoder = encoder or MiniLMEncoder()
        embeddings = np.load(cache)
        if embeddings.shape != (len(corpus), encoder.model.config.hidden_size):
            return None
        return cls(corpus, embeddings, encoder)

    @classmethod
    def build(cls, corpus: Corpus, cache_dir: Path | None = None, progress: bool = False) -> DenseRetriever:
        """Encode the corpus, or load its vectors from ``cache_dir`` when this exact corpus was encoded before."""
        encoder = MiniLMEncoder()
        found = cls.cached(corpus, cache_dir, encoder)
        if found is not None:
            return found
        cache = cls._cache_file(corpus, cache_dir)
        embeddings = encoder.encode(corpus.texts(), progress=progress)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp-{os.getpid()}.npy")
            np.save(tmp, embeddings)
            os.replace(tmp, cache)
            cache.with_suffix(".json").write_text(json.dumps({"corpus": corpus.path, "sha256": corpus.sha256,
                                                              "passages": len(corpus)}))
        return cls(corpus, embeddings, encoder)

    def _search_pids(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        scores = self.encoder.encode(queries) @ self.embeddings.T
        results = []
        for row in scores:
            top = np.argpartition(-row, k - 1)[:k] if k < row.size else np.arange(row.size)
            top = top[np.argsort(-row[top], kind="stable")]
            results.append([(int(p), float(row[p])) for p in top])
        return results
