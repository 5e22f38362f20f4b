"""The manifest of a built index (``apexdsp-index.json``): what it was built from, and the checks on load.

It is written last, so a directory without one is a build that never finished. Loading compares it
with the world: the encoder the index was built with must still be the same weights (else queries and
passages would be encoded by different models and scores would be meaningless), and a caller that
names the corpus or encoder it expects gets an error when the index was built from another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ValidationError

from apexdsp.errors import ApexError

MANIFEST_FILE = "apexdsp-index.json"
FORMAT = "apexdsp-colbert-index/1"


class IndexManifest(BaseModel):
    format: str = FORMAT
    corpus_path: str
    corpus_sha256: str
    passages: int
    encoder_path: str
    encoder_fingerprint: str
    nbits: int
    partitions: int | None = None  # k-means centroids (absent from manifests written before it was recorded)
    embeddings: int | None = None  # token embeddings stored
    dim: int
    doc_maxlen: int
    query_maxlen: int
    build_seconds: float
    passages_per_second: float
    index_bytes: int
    bytes_per_passage: float
    created_at: str
    apexdsp_version: str
    colbert_version: str
    torch_version: str
    load_average: list[float] = []

    def write(self, directory: Path) -> Path:
        target = directory / MANIFEST_FILE
        tmp = target.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.model_dump(), indent=2))
        os.replace(tmp, target)
        return target

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> IndexManifest:
        """The manifest of an index directory; a one-line error for a missing, half-written or foreign one."""
        folder = Path(directory).expanduser()
        if not folder.exists():
            raise ApexError(f"index {directory} not found: build it with `apexdsp index build`")
        if not folder.is_dir():
            raise ApexError(f"index {directory} is not a directory")
        source = folder / MANIFEST_FILE
        if not source.is_file():
            raise ApexError(f"index {directory} has no {MANIFEST_FILE}: not an apexdsp index, or its build did "
                            "not finish; rebuild it with `apexdsp index build`")
        try:
            manifest = cls.model_validate_json(source.read_text())
        except (ValidationError, ValueError) as error:
            raise ApexError(f"index {directory}: {MANIFEST_FILE} is unreadable ({str(error).splitlines()[0]}); "
                            "rebuild the index") from None
        if manifest.format != FORMAT:
            raise ApexError(f"index {directory} has format {manifest.format!r}, expected {FORMAT!r}: rebuild it")
        return manifest

    def check_encoder(self, directory: str | os.PathLike[str], expected: str | os.PathLike[str] | None = None) -> Path:
        """The encoder folder to encode queries with, after checking it is the one the index was built with."""
        from apexdsp.indexes.encoder import encoder_fingerprint

        encoder = Path(expected or self.encoder_path)
        if not encoder.exists():
            raise ApexError(f"index {directory} was built with encoder {self.encoder_path}, which no longer exists")
        fingerprint = encoder_fingerprint(encoder)
        if fingerprint != self.encoder_fingerprint:
            raise ApexError(
                f"index {directory} was built with encoder {self.encoder_path} (fingerprint "
                f"{self.encoder_fingerprint}), but {encoder} has fingerprint {fingerprint}: "
                "queries would be encoded by another model; rebuild the index with this encoder"
            )
        return encoder.resolve()

    def check_corpus(self, directory: str | os.PathLike[str], corpus: str | os.PathLike[str]) -> None:
        """An error unless ``corpus`` is byte-for-byte the corpus the index was built from."""
        from apexdsp.data.loaders import file_sha256

        digest = file_sha256(corpus)
        if digest != self.corpus_sha256:
            raise ApexError(
                f"index {directory} was built from {self.corpus_path} (sha256 {self.corpus_sha256[:12]}), "
                f"not from {os.fspath(corpus)} (sha256 {digest[:12]}): rebuild the index for this corpus"
            )
