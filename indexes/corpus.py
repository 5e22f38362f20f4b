"""A retrieval corpus, validated strictly before anything is encoded.

Indexes address passages by position (colbert-ai uses integer pids) and return the corpus ids to the
programs, so a corpus must be non-empty, with unique ids and non-blank text: a blank passage would be
encoded into an empty token list and a duplicate id would make two hits indistinguishable. These
checks fail fast, on the line that breaks them, before minutes of encoding are spent.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from apexdsp.data.loaders import file_sha256, iter_jsonl
from apexdsp.data.records import Passage
from apexdsp.errors import DataError

PASSAGES_FILE = "passages.jsonl"


def passage_text(title: str, text: str) -> str:
    """What every index encodes for a passage: the title and the text, so both are searchable."""
    return f"{title} | {text}" if title else text


@dataclass
class Corpus:
    """The passages of one corpus file, in file order (position = integer pid), with the file's hash."""

    passages: list[Passage]
    path: str = ""
    sha256: str = ""
    _by_id: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._by_id:
            self._by_id = {passage.id: pid for pid, passage in enumerate(self.passages)}

    def __len__(self) -> int:
        return len(self.passages)

    def __getitem__(self, pid: int) -> Passage:
        return self.passages[pid]

    def pid_of(self, passage_id: str) -> int | None:
        return self._by_id.get(passage_id)

    def texts(self) -> list[str]:
        """``title | text`` per passage, in pid order."""
        return [passage_text(p.title, p.text) for p in self.passages]


def _passage(name: str, line_number: int, value: dict) -> Passage:
    for key in ("id", "title", "text"):
        if key not in value:
            raise DataError(f"{name} line {line_number}: field '{key}' missing")
        allowed = (str, int) if key == "id" else (str,)
        if not isinstance(value[key], allowed) or isinstance(value[key], bool):
            raise DataError(f"{name} line {line_number}: field '{key}' must be a string")
    passage_id, title, text = str(value["id"]).strip(), str(value["title"]), str(value["text"])
    if not passage_id:
        raise DataError(f"{name} line {line_number}: field 'id' is empty")
    if not text.strip():
        raise DataError(f"{name} line {line_number}: field 'text' is empty (passage {passage_id!r})")
    return Passage(id=passage_id, title=title, text=text)


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Read and validate a corpus JSONL file (``{"id", "title", "text"}`` per line).

    Raises :class:`DataError` naming file and line for: a missing file, a line that is not a JSON object,
    a missing field, an empty id or text, a duplicate id, and a file with no passages at all.
    """
    name = os.fspath(path)
    if not Path(name).is_file():
        raise DataError(f"corpus {name} not found" if not Path(name).exists() else f"corpus {name} is not a file")
    passages: list[Passage] = []
    first_line: dict[str, int] = {}
    for line_number, value in iter_jsonl(name):
        passage = _passage(name, line_number, value)
        if passage.id in first_line:
            raise DataError(
                f"{name} line {line_number}: field 'id' duplicates line {first_line[passage.id]} ({passage.id!r})"
            )
        first_line[passage.id] = line_number
        passages.append(passage)
    if not passages:
        raise DataError(f"corpus {name} is empty: no passages to index")
    return Corpus(passages=passages, path=str(Path(name).resolve()), sha256=file_sha256(name))


def write_passage_table(corpus: Corpus, directory: Path) -> Path:
    """The pid -> id/title/text table kept beside an index (one JSON object per line, pid order)."""
    target = directory / PASSAGES_FILE
    with open(target, "w", encoding="utf-8") as handle:
        for passage in corpus.passages:
            handle.write(json.dumps(passage.model_dump(), ensure_ascii=False) + "\n")
    return target


def read_passage_table(directory: Path) -> Corpus:
    """The passage table written by :func:`write_passage_table` (already validated at build time)."""
    source = directory / PASSAGES_FILE
    if not source.is_file():
        raise DataError(f"index {directory} has no {PASSAGES_FILE}: rebuild it with `apexdsp index build`")
    with open(source, encoding="utf-8") as handle:
        passages = [Passage.model_validate_json(line) for line in handle if line.strip()]
    return Corpus(passages=passages, path=str(source))
