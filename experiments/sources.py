"""What experiment steps read: question slices (with a seeded sample) and files, and how they enter step keys.

A file enters a key by its SHA-256, computed once per process while the file is unchanged, so a spec that
moves its data keeps its keys and a data file edited in place changes them.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path
from typing import Any

from apexdsp.errors import ApexError
from apexdsp.experiments.spec import QuestionSource


@lru_cache(maxsize=256)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    from apexdsp.data.loaders import file_sha256

    return file_sha256(path)


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file, computed once per process for an unchanged file."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_mtime_ns, stat.st_size)


def source_identity(source: QuestionSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    # A slice without a sample keeps the key it had before ``sample`` existed.
    unset = {"sample", "sample_seed"} if source.sample is None else set()
    identity = source.model_dump(mode="json", exclude={"file", *unset})
    if source.file is not None:
        identity["sha256"] = file_hash(source.file)
    return identity


def load_source(source: QuestionSource | None) -> list[Any]:
    """The questions of a source slice (file order; ``offset`` then ``limit``, then the seeded ``sample``)."""
    if source is None:
        return []
    from apexdsp.data.loaders import load_questions

    end = source.offset + source.limit if source.limit else None
    name = source.file if source.file is not None else source.hub
    questions = load_questions(name, split=source.split, limit=end)[source.offset:]
    if not questions:
        raise ApexError(f"{source.describe()}: no questions in this slice")
    if source.sample is not None:
        if source.sample > len(questions):
            raise ApexError(f"{source.describe()}: sample {source.sample} is larger than the slice "
                            f"({len(questions)} questions)")
        drawn = sorted(random.Random(source.sample_seed).sample(range(len(questions)), source.sample))
        questions = [questions[i] for i in drawn]
    return questions
