"""An evaluation killed part-way resumes from its progress file: finished questions are not run again, a file
written by another run is refused before any model loads, and a row that cannot be written stops the run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from apexdsp.data.loaders import read_questions
from apexdsp.errors import ApexError
from apexdsp.eval_checkpoint import EvalCheckpoint, ProgressWriteError, run_provenance
from apexdsp.evaluation import evaluate_program
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.lm.registry import get_lm
from apexdsp.programs.registry import build_program

APEXDSP = str(Path(sys.executable).parent / "apexdsp")


def run_evaluate(questions: Path, progress: Path, *extra: str, lm: str | None = None,
                 limit: int = 1) -> subprocess.CompletedProcess:
    command = [APEXDSP, "evaluate", "--program", "vanilla", "--questions", str(questions), "--limit", str(limit),
               "--threads", "2", "--no-track", "--json", "--resume", str(progress), *extra]
    if lm is not None:
        command += ["--lm", lm]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused run prints (after asserting it exited 2 with nothing else on stderr)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_resumed_evaluation_runs_only_the_questions_it_had_not_finished(tiny_model_dir, data_dir, tmp_path):
    questions = read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=4)
    checkpoint = tmp_path / "progress.jsonl"
    lm = get_lm(str(tiny_model_dir), max_tokens=8)
    program = build_program("vanilla")
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        first = evaluate_program(program, questions[:2], threads=2, retrieves=False, progress=False,
                                 checkpoint=checkpoint)
        with checkpoint.open("a") as handle:
            handle.write('{"segment": 0, "at": 1.0, "result": {"id": "cut-off')  # a kill mid-write
        calls_before = len(lm.history)
        resumed = evaluate_program(program, questions, threads=2, retrieves=False, progress=False,
                                   checkpoint=checkpoint)
    assert len(lm.history) - calls_before == 2  # vanilla: one LM call per question, only the two new ones
    assert resumed.n == 4 and [r.id for r in resumed.results] == [q.id for q in questions]
    assert [r.prediction for r in resumed.results[:2]] == [r.prediction for r in first.results]
    assert resumed.seconds >= first.seconds
    lines = checkpoint.read_text().splitlines()
    assert len(lines) == 5  # two rows, the cut-off line, two rows


def test_evaluate_resume_on_the_command_line_adds_only_the_missing_questions(data_dir, tmp_path):
    progress = tmp_path / "vanilla-dev.jsonl"
    questions = data_dir / "hotpotqa" / "dev.jsonl"

    def evaluate(limit: int) -> dict:
        result = run_evaluate(questions, progress, limit=limit)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert evaluate(2)["n"] == 2
    first_rows = progress.read_text().splitlines()
    header = json.loads(first_rows[0])["provenance"]
    assert header["program"] == "vanilla" and header["lm"] == "smollm2-135m" and header["index"] is None
    assert header["compiled"] == "uncompiled" and len(header["questions"]) == 64
    summary = evaluate(3)
    assert summary["n"] == 3 and summary["lm_calls"] == 1.0 and summary["failures"] == 0
    rows = progress.read_text().splitlines()
    assert rows[:3] == first_rows and len(rows) == 4  # the header, two kept rows, one new row


def test_a_progress_file_of_another_run_is_refused_before_any_model_loads(tiny_model_dir, data_dir, tmp_path):
    questions = data_dir / "hotpotqa" / "dev.jsonl"
    progress = tmp_path / "progress.jsonl"
    first = run_evaluate(questions, progress, lm=str(tiny_model_dir))
    assert first.returncode == 0, first.stderr
    written = progress.read_bytes()

    # Another LM: an unknown name would fail on loading, so the refusal shows the file was checked first.
    line = error_line(run_evaluate(questions, progress, lm="no-such-model"))
    assert f"--resume {progress} was written by LM '{tiny_model_dir}'" in line
    assert "this run is LM 'no-such-model': use another file" in line

    other_questions = tmp_path / "dev-head.jsonl"
    other_questions.write_text("".join(questions.read_text().splitlines(keepends=True)[:3]))
    line = error_line(run_evaluate(other_questions, progress, lm=str(tiny_model_dir)))
    assert "was written by questions sha256" in line and "LM" not in line

    line = error_line(run_evaluate(questions, progress, "--option", "max_tokens=4", lm=str(tiny_model_dir)))
    assert "was written by options {}; this run is options {\"max_tokens\": 4}" in line
    assert progress.read_bytes() == written  # a refused run leaves the file as it was


def test_a_progress_file_without_a_header_is_refused_and_left_alone(tiny_model_dir, data_dir, tmp_path):
    questions = read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=1)
    provenance = run_provenance(program="vanilla", lm=str(tiny_model_dir),
                                questions=data_dir / "hotpotqa" / "dev.jsonl")
    headerless = tmp_path / "old.jsonl"
    with dspy.context(lm=get_lm(str(tiny_model_dir), max_tokens=8), adapter=TolerantChatAdapter()):
        evaluate_program(build_program("vanilla"), questions, threads=1, retrieves=False, progress=False,
                         checkpoint=headerless)  # a library caller's file: no provenance, no header
    kept = headerless.read_bytes()
    with pytest.raises(ApexError, match="holds answers to 1 questions but does not record what produced them"):
        EvalCheckpoint(headerless, provenance, label="--resume")
    not_progress = tmp_path / "questions.jsonl"
    shutil.copy(data_dir / "hotpotqa" / "dev.jsonl", not_progress)
    with pytest.raises(ApexError, match="is not an apexdsp progress file"):
        EvalCheckpoint(not_progress, provenance)
    assert headerless.read_bytes() == kept
    assert not_progress.read_bytes() == (data_dir / "hotpotqa" / "dev.jsonl").read_bytes()


@pytest.mark.parametrize("where", ["directory", "under-a-file"])
def test_an_unusable_resume_path_is_refused_before_any_index_or_model_loads(where, data_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a regular file\n")
    progress = tmp_path if where == "directory" else blocker / "progress.jsonl"
    # Both the index and the LM would fail to load: the refusal shows the path was checked first.
    result = run_evaluate(data_dir / "hotpotqa" / "dev.jsonl", progress, "--index", str(tmp_path / "no-index"),
                          lm="no-such-model")
    line = error_line(result)
    expected = "is a directory" if where == "directory" else "cannot create its folder"
    assert f"--resume {progress} {expected}" in line or f"--resume {progress}: {expected}" in line
    assert blocker.read_text() == "a regular file\n"


def replace_with_a_directory(progress: Path) -> None:
    """Move the progress file aside and put a directory in its place: no write, not even root's, appends."""
    progress.rename(progress.with_name("kept.jsonl"))
    progress.mkdir()


class ReplacesTheFileBeforeQuestion(dspy.Module):
    """The real program, but its progress file is replaced by a directory before question ``n`` starts."""

    def __init__(self, program: dspy.Module, progress: Path, n: int | None):
        super().__init__()
        self.program, self.progress, self.n, self.calls = program, progress, n, 0

    def forward(self, question: str) -> dspy.Prediction:
        self.calls += 1
        if self.calls == self.n:
            replace_with_a_directory(self.progress)
        return self.program(question=question)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_that_cannot_be_written_stops_the_run(threads, tiny_model_dir, data_dir, tmp_path):
    source = data_dir / "hotpotqa" / "dev.jsonl"
    questions = read_questions(source, limit=4)
    progress = tmp_path / "progress.jsonl"
    checkpoint = EvalCheckpoint(progress, run_provenance(program="vanilla", lm=str(tiny_model_dir),
                                                         questions=source))
    lm = get_lm(str(tiny_model_dir), max_tokens=8)
    # One thread: the file goes after the first answer is written; two: after the header, before any answer.
    program = ReplacesTheFileBeforeQuestion(build_program("vanilla"), progress, n=2 if threads == 1 else None)
    if threads == 2:
        replace_with_a_directory(progress)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()), \
            pytest.raises(ProgressWriteError, match=f"cannot write progress file {progress}: Is a directory"):
        evaluate_program(program, questions, threads=threads, retrieves=False, progress=False,
                         checkpoint=checkpoint)
    kept = (tmp_path / "kept.jsonl").read_text().splitlines()
    assert "apexdsp_progress" in kept[0]
    if threads == 1:  # the first answer is kept, the second ran but could not be written, no third started
        assert len(kept) == 2 and len(lm.history) == 2
    else:  # at most the two questions under way when the write failed ran
        assert len(kept) == 1 and 1 <= len(lm.history) <= 2


def test_a_line_cut_off_by_a_kill_is_ignored_on_resume(tiny_model_dir, data_dir, tmp_path):
    questions = data_dir / "hotpotqa" / "dev.jsonl"
    progress = tmp_path / "progress.jsonl"
    assert run_evaluate(questions, progress, lm=str(tiny_model_dir)).returncode == 0
    first = progress.read_text().splitlines()
    with progress.open("a") as handle:
        handle.write('{"segment": 0, "at": 2.5, "result": {"id": "')  # a kill mid-write
    result = run_evaluate(questions, progress, lm=str(tiny_model_dir), limit=2)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 2 and summary["failures"] == 0
    lines = progress.read_text().splitlines()
    assert lines[:2] == first and len(lines) == 4  # header, kept row, the cut-off line, the new row
    assert json.loads(lines[3])["segment"] == 1
