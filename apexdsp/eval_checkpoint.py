"""The progress file of an evaluation: finished questions appended as they finish, so a killed run resumes.

The file is JSONL. With a provenance (what the command line passes), its first line is a header that
records what produced the answers below it: the program, a hash of its compiled state (or
``"uncompiled"``), the LM, the index, a hash of the question file and the program options. A run whose
provenance differs from the header's is refused before any question is run, so answers of one program,
model or question set are never reused for another. Every other line is one scored question.

Writes are one ``write`` of a whole line per question, flushed and synced; a line cut off by a kill is
ignored on resume (that question runs again). A failure to write a row is an error of the run
(:class:`ProgressWriteError`), never a failed question.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apexdsp.errors import ApexError

if TYPE_CHECKING:
    from apexdsp.evaluation import QuestionResult

HEADER_KEY = "apexdsp_progress"
HEADER_VERSION = 1
# Provenance fields in the order a mismatch names them, with the words it uses.
FIELDS = {"program": "program", "compiled": "compiled state", "lm": "LM", "index": "index",
          "questions": "questions sha256", "options": "options"}


class ProgressWriteError(ApexError):
    """A row could not be appended to the progress file; the evaluation stops."""


def run_provenance(*, program: str, lm: str, questions: str | os.PathLike[str],
                   index: str | os.PathLike[str] | None = None, compiled: str | os.PathLike[str] | None = None,
                   options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What an evaluation's answers depend on, as a progress file's header records it.

    ``compiled``: a compiled program directory, hashed by its manifest and state file (every save writes
    a new manifest, so a recompile changes the hash). ``lm``: a registry name as given, a local folder by
    its absolute path. ``questions``: hashed whole, so a rerun with a larger ``--limit`` still matches.
    """
    from apexdsp.data.loaders import file_sha256

    lm_path = Path(lm).expanduser()
    return {
        "program": program,
        "compiled": compiled_state_hash(compiled) if compiled is not None else "uncompiled",
        "lm": str(lm_path.resolve()) if lm_path.is_dir() else lm,
        "index": str(Path(index).expanduser().resolve()) if index is not None else None,
        "questions": file_sha256(questions),
        "options": json.loads(json.dumps(dict(options or {}), sort_keys=True, default=str)),
    }


def compiled_state_hash(directory: str | os.PathLike[str]) -> str:
    """SHA-256 over a compiled program's manifest and saved state (``sha256:`` and 16 hex digits)."""
    from apexdsp.optimizers.compiled import MANIFEST_FILE, STATE_FILE

    digest = hashlib.sha256()
    for name in (MANIFEST_FILE, STATE_FILE):
        path = Path(directory) / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return "sha256:" + digest.hexdigest()[:16]


class EvalCheckpoint:
    """Scored questions appended to a JSONL file as they finish, so an interrupted evaluation resumes.

    Each row is one :class:`~apexdsp.evaluation.QuestionResult` with the run segment that wrote it and the
    seconds since that segment started; a rerun skips the questions found there and adds the segments'
    times to its own. A question whose program raised is not written: it is tried again on resume.

    Opening checks everything a run needs before it loads a model: the path is not a directory, its
    folder exists or can be made, the file can be appended to, and, with ``provenance``, the header
    matches it (a file of answers without a header cannot be checked and is refused; a file holding only
    a header, left by a run that stopped before its first answer, is given this run's header). Without
    ``provenance`` no header is written and any header found is not compared. ``label`` names the file
    in messages (``--resume`` on the command line).
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, Any] | None = None, *,
                 label: str = "progress file"):
        self.path = Path(path)
        self.label = label
        self.provenance = json.loads(json.dumps(dict(provenance), default=str)) if provenance is not None else None
        self.done: dict[str, QuestionResult] = {}
        self.previous_seconds = 0.0
        self.segment = 0
        self._lock = threading.Lock()
        where = f"{label} {self.path}"
        if self.path.is_dir():
            raise ApexError(f"{where} is a directory: give the path of a file (it is created if missing)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            blocker = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
            reason = f"{blocker} is a file, not a folder" if blocker else (error.strerror or str(error))
            raise ApexError(f"{where}: cannot create its folder: {reason}") from None
        header, other_lines = self._read() if self.path.is_file() else (None, 0)
        if self.provenance is not None:
            self._check_header(header, other_lines)
        self._append(b"")  # can it be appended to? (and end a line cut off by a kill)

    def _read(self) -> tuple[dict[str, Any] | None, int]:
        """Load the rows; return the header's provenance (if any) and how many non-blank lines are not it."""
        from apexdsp.evaluation import QuestionResult

        try:
            lines = self.path.read_bytes().decode("utf-8", errors="replace").splitlines()
        except OSError as error:
            raise ApexError(f"{self.label} {self.path}: cannot read it: {error.strerror or error}") from None
        header = None
        other_lines = 0
        segment_seconds: dict[int, float] = {}
        for number, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if number == 0 and isinstance(row, dict) and HEADER_KEY in row:
                header = row.get("provenance") if isinstance(row.get("provenance"), dict) else {}
                continue
            if line.strip():
                other_lines += 1
            try:
                result = QuestionResult(**row["result"])
                segment = int(row.get("segment", 0))
                at = float(row.get("at", 0.0))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut off by a kill
            self.done[result.id] = result
            segment_seconds[segment] = max(segment_seconds.get(segment, 0.0), at)
        self.previous_seconds = sum(segment_seconds.values())
        self.segment = max(segment_seconds, default=-1) + 1
        return header, other_lines

    def _check_header(self, header: dict[str, Any] | None, other_lines: int) -> None:
        """Refuse a file written by another run; give a new (or answer-less) file this run's header."""
        where = f"{self.label} {self.path}"
        if header is None and self.done:
            raise ApexError(f"{where} holds answers to {len(self.done)} questions but does not record what "
                            "produced them (no header), so they cannot be checked against this run: "
                            "use another file")
        if header is None and other_lines:
            raise ApexError(f"{where} is not an apexdsp progress file (no header, no answers): use another file")
        if header is not None and self.done:
            differ = [key for key in FIELDS if header.get(key) != self.provenance.get(key)]
            if differ:
                raise ApexError(f"{where} was written by {_describe(header, differ)}; this run is "
                                f"{_describe(self.provenance, differ)}: use another file")
            return
        if header == self.provenance and other_lines == 0:
            return
        line = json.dumps({HEADER_KEY: HEADER_VERSION, "provenance": self.provenance}, sort_keys=False)
        self._write(line.encode() + b"\n", mode="wb")  # nothing to keep: at most one line cut off by a kill
        self.segment, self.previous_seconds = 0, 0.0

    def add(self, result: QuestionResult, at: float) -> None:
        """Append one scored question (one line, flushed and synced); raises :class:`ProgressWriteError`."""
        line = json.dumps({"segment": self.segment, "at": round(at, 3), "result": result.model_dump()})
        self._append(line.encode() + b"\n")

    def _append(self, data: bytes) -> None:
        """Append ``data`` after ending a last line that a kill cut off, so it starts on a line of its own."""
        with self._lock:
            self._write(data, mode="ab", end_torn_line=True)

    def _write(self, data: bytes, *, mode: str, end_torn_line: bool = False) -> None:
        try:
            with self.path.open(mode) as handle:
                if end_torn_line and handle.tell() and _last_byte(self.path) != b"\n":
                    data = b"\n" + data
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise ProgressWriteError(f"cannot write {self.label} {self.path}: {error.strerror or error}; "
                                     "the evaluation stopped (the answers written so far are kept)") from None


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


def _describe(provenance: Mapping[str, Any], keys: list[str]) -> str:
    """``program 'apex', LM 'smollm2-135m'``: the named fields of a provenance, hashes shortened."""
    parts = []
    for key in keys:
        value = provenance.get(key)
        if key == "questions" and isinstance(value, str):
            value = value[:12]
        shown = json.dumps(value, sort_keys=True) if key == "options" else repr(value)
        parts.append(f"{FIELDS[key]} {shown}")
    return ", ".join(parts)
