"""Read question and corpus JSONL files (the format of ``shared/data``) into records, streaming.

Every problem with a file becomes a one-line :class:`~apexdsp.errors.DataError` that names the file
(as the user wrote it), the line and the field, e.g. ``dev.jsonl line 17: field 'answer' missing``, so
the CLI can print it without a traceback. Blank lines are skipped; ids must be unique within a file,
because indexes and result files key on them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from apexdsp.data import hub
from apexdsp.data.records import Passage, Question, describe_validation_error
from apexdsp.errors import DataError

__all__ = [
    "iter_jsonl",
    "iter_questions",
    "read_questions",
    "iter_corpus",
    "read_corpus",
    "load_questions",
    "file_sha256",
]

Record = TypeVar("Record", bound=BaseModel)
PathLike = str | os.PathLike[str]


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line; one JSON object per line."""
    name = os.fspath(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as error:
        raise DataError(f"cannot read {name}: {error.strerror or error}") from None
    with handle:
        try:
            # Bytes, decoded line by line: a bad byte is then reported on its own line (text mode
            # decodes ahead in 8 KiB chunks and would blame an earlier line).
            for line_number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(f"{name} line {line_number}: not valid UTF-8 ({error.reason})") from None
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{name} line {line_number}: not valid JSON ({error.msg} at column {error.colno})"
                    ) from None
                if not isinstance(value, dict):
                    raise DataError(
                        f"{name} line {line_number}: expected a JSON object, got {type(value).__name__}"
                    )
                yield line_number, value
        except OSError as error:  # a directory, or an I/O error mid-file
            raise DataError(f"cannot read {name}: {error.strerror or error}") from None


def _iter_records(path: PathLike, model: type[Record]) -> Iterator[Record]:
    name = os.fspath(path)
    first_line_of: dict[str, int] = {}
    for line_number, value in iter_jsonl(path):
        try:
            record = model.model_validate(value)
        except ValidationError as error:
            raise DataError(f"{name} line {line_number}: {describe_validation_error(error)}") from None
        record_id = record.id  # type: ignore[attr-defined]
        if record_id in first_line_of:
            raise DataError(
                f"{name} line {line_number}: field 'id' duplicates line {first_line_of[record_id]} ({record_id!r})"
            )
        first_line_of[record_id] = line_number
        yield record


def iter_questions(path: PathLike) -> Iterator[Question]:
    """Stream the questions of a JSONL file."""
    return _iter_records(path, Question)


def read_questions(path: PathLike, limit: int | None = None) -> list[Question]:
    """The first ``limit`` questions of a JSONL file (all when ``None``); lines after them are not read."""
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    questions: list[Question] = []
    if limit == 0:
        return questions
    for question in iter_questions(path):
        questions.append(question)
        if limit is not None and len(questions) >= limit:
            break
    return questions


def iter_corpus(path: PathLike) -> Iterator[Passage]:
    """Stream the passages of a corpus JSONL file."""
    return _iter_records(path, Passage)


def read_corpus(path: PathLike) -> list[Passage]:
    """All passages of a corpus JSONL file."""
    return list(iter_corpus(path))


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (for run manifests: which exact data a result came from)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
    except OSError as error:
        raise DataError(f"cannot read {os.fspath(path)}: {error.strerror or error}") from None
    return digest.hexdigest()


def load_questions(
    source: PathLike, split: str | None = None, limit: int | None = None, cache_dir: PathLike | None = None
) -> list[Question]:
    """Questions from a JSONL path or a hub dataset name: hotpotqa, 2wikimultihopqa, musique, bamboogle.

    A path that exists wins over a hub name, so a local file called ``musique`` is still read as a
    file. ``split`` only applies to hub datasets (each has a default). ``cache_dir`` is passed to
    ``datasets.load_dataset``.
    """
    name = os.fspath(source)
    if not Path(name).exists() and name.lower() in hub.HUB_DATASETS:
        return hub.load_hub_questions(name.lower(), split=split, limit=limit, cache_dir=cache_dir)
    if split is not None:
        raise DataError(f"split {split!r} applies to hub datasets only; {name} is read as a JSONL file")
    return read_questions(name, limit=limit)
