"""``apexdsp index build``: a real colbert-ai (PLAID) index over a corpus, built on CPU.

Layout of an index directory::

    apexdsp-index.json   manifest (written last: its absence means an unfinished build)
    passages.jsonl       pid -> id/title/text (colbert knows passages only by integer position)
    colbert/             colbert-ai's index files (centroids, residual codes, ivf, metadata)

The directory is built in a temporary sibling and swapped in only when complete, so an interrupted
build never damages an index that was already there.

One change to colbert's indexer, for speed: colbert encodes a sample of the collection to train the
k-means centroids, then encodes the whole collection again to compress it. Below about 30k passages its
sample *is* the whole collection, so every passage was encoded twice; :class:`EncodeOnceIndexer` keeps
the sample's embeddings and reuses them, which halves the encoding time; the stored embeddings are the
ones colbert's second pass would compute (same passages, same model, same batches while the collection
fits in one chunk of 25k).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from apexdsp.indexes.atomic import building
from apexdsp.indexes.corpus import load_corpus, write_passage_table
from apexdsp.indexes.encoder import check_encoder_dir, encoder_fingerprint
from apexdsp.indexes.manifest import IndexManifest

COLBERT_SUBDIR = "colbert"


def _encode_once_indexer(partitions: int | None = None):
    """colbert's ``encode`` entry point with :class:`EncodeOnceIndexer`; defined lazily (imports colbert)."""
    import torch
    import tqdm
    from colbert.indexing.collection_indexer import CollectionIndexer
    from colbert.infra import Run

    class EncodeOnceIndexer(CollectionIndexer):
        """colbert's ``CollectionIndexer`` that reuses the k-means sample's embeddings when it is everything."""

        _reuse: tuple[torch.Tensor, list[int], torch.Tensor] | None = None

        def setup(self):
            super().setup()
            if partitions is not None and partitions != self.num_partitions:
                Run().print_main(f"#> Using {partitions:,} partitions instead of colbert's {self.num_partitions:,}.")
                self.num_partitions = partitions
                self._save_plan()

        def _sample_embeddings(self, sampled_pids):
            if self.nranks != 1 or len(sampled_pids) != len(self.collection):
                return super()._sample_embeddings(sampled_pids)
            # The parent's single-process CPU branch, keeping the embeddings and doclens it would drop.
            passages = [passage for _, passage in self.collection.enumerate(rank=self.rank)]
            embs, doclens = self.encoder.encode_passages(passages)
            embs = embs.half()
            self.num_sample_embs = torch.tensor([embs.size(0)])
            self.avg_doclen_est = sum(doclens) / len(doclens)
            torch.save(embs, os.path.join(self.config.index_path_, f"sample.{self.rank}.pt"))
            self._reuse = (embs, list(doclens), torch.cumsum(torch.tensor([0, *doclens]), 0))
            return self.avg_doclen_est

        def index(self):
            if self._reuse is None:
                return super().index()
            embs, doclens, offsets = self._reuse
            with self.saver.thread():
                batches = self.collection.enumerate_batches(rank=self.rank)
                for chunk_idx, offset, passages in tqdm.tqdm(batches, desc="colbert: compressing chunks"):
                    end = offset + len(passages)
                    self.saver.save_chunk(chunk_idx, offset, embs[offsets[offset]:offsets[end]], doclens[offset:end])
            self._reuse = None

    def encode(config, collection, shared_lists, shared_queues, verbose=1):
        EncodeOnceIndexer(config=config, collection=collection, verbose=verbose).run(shared_lists)

    return encode


def _directory_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def run_colbert_indexer(texts: list[str], encoder: Path, index_path: Path, nbits: int, verbose: int = 1,
                        partitions: int | None = None) -> None:
    """Index ``texts`` (pid = position) with colbert-ai on CPU, in this process, into ``index_path``.

    ``partitions`` overrides colbert's number of k-means centroids (``2**floor(log2(16 * sqrt(embeddings)))``,
    16,384 for HotpotQA's 1.5M token embeddings, whose k-means is about half of the build on two cores). A
    quarter of that rule builds 2WikiMultihopQA's index 1.5x faster but loses 2.9 points of recall@5
    (docs/notes/retrieval.md), so the default stays colbert's.
    """
    from apexdsp.indexes.extensions import load_extensions

    load_extensions()  # under a lock that a killed process cannot leave behind (see extensions.py)
    from colbert import Indexer
    from colbert.infra import Run, RunConfig
    from colbert.infra.launcher import Launcher

    from apexdsp.indexes.encoder import colbert_config, quiet_colbert

    run_root = index_path.parent / ".colbert-run"  # colbert's own run logs stay inside the staging folder
    run_config = RunConfig(nranks=1, gpus=0, avoid_fork_if_possible=True, root=str(run_root), experiment="apexdsp")
    with quiet_colbert(keep_output=verbose > 0), Run().context(run_config):
        indexer = Indexer(checkpoint=str(encoder), config=colbert_config(encoder, nbits=nbits, index_bsize=32),
                          verbose=verbose)
        indexer.configure(collection=texts, index_path=str(index_path), index_name=index_path.name, resume=False,
                          bsize=64, partitions=None)
        index_path.mkdir(parents=True, exist_ok=True)
        Launcher(_encode_once_indexer(partitions)).launch_without_fork(indexer.config, texts, [], [], verbose)
    import shutil

    shutil.rmtree(run_root, ignore_errors=True)


def build_index(corpus_path: str | os.PathLike[str], encoder_dir: str | os.PathLike[str],
                out: str | os.PathLike[str], nbits: int = 2, threads: int = 2, verbose: int = 1,
                partitions: int | None = None) -> IndexManifest:
    """Validate the corpus, index it with the trained encoder, and swap the finished index into ``out``."""
    from apexdsp.errors import ApexError

    if nbits not in (1, 2, 4, 8):
        raise ApexError(f"nbits must be 1, 2, 4 or 8 (bits per residual dimension), got {nbits}")
    if partitions is not None and (partitions < 2 or partitions & (partitions - 1)):
        raise ApexError(f"partitions must be a power of two >= 2, got {partitions}")
    corpus = load_corpus(corpus_path)
    encoder = check_encoder_dir(encoder_dir)
    fingerprint = encoder_fingerprint(encoder)

    from apexdsp.paths import configure_environment

    configure_environment()
    from importlib.metadata import version

    import torch
    from colbert.infra import ColBERTConfig

    import apexdsp

    torch.set_num_threads(threads)
    shape = ColBERTConfig.load_from_checkpoint(str(encoder))
    started = time.perf_counter()
    with building(out) as staging:
        write_passage_table(corpus, staging)
        run_colbert_indexer(corpus.texts(), encoder, staging / COLBERT_SUBDIR, nbits, verbose, partitions)
        seconds = time.perf_counter() - started
        metadata = json.loads((staging / COLBERT_SUBDIR / "metadata.json").read_text())
        size = _directory_bytes(staging / COLBERT_SUBDIR)
        manifest = IndexManifest(
            corpus_path=corpus.path, corpus_sha256=corpus.sha256, passages=len(corpus),
            encoder_path=str(encoder), encoder_fingerprint=fingerprint, nbits=nbits, dim=shape.dim,
            partitions=metadata["num_partitions"], embeddings=metadata["num_embeddings"],
            doc_maxlen=shape.doc_maxlen, query_maxlen=shape.query_maxlen, build_seconds=round(seconds, 2),
            passages_per_second=round(len(corpus) / seconds, 2), index_bytes=size,
            bytes_per_passage=round(size / len(corpus), 1), created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            apexdsp_version=apexdsp.__version__, colbert_version=version("colbert-ai"),
            torch_version=torch.__version__, load_average=[round(x, 2) for x in os.getloadavg()],
        )
        manifest.write(staging)
    return manifest
