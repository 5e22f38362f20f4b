"""An evaluation killed part-way resumes from its checkpoint: finished questions are not run again."""

from __future__ import annotations

import dspy

from apexdsp.data.loaders import read_questions
from apexdsp.evaluation import evaluate_program
from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.lm.registry import get_lm
from apexdsp.programs.registry import build_program


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
    import json
    import subprocess
    import sys
    from pathlib import Path

    apexdsp = str(Path(sys.executable).parent / "apexdsp")
    progress = tmp_path / "vanilla-dev.jsonl"

    def evaluate(limit: int) -> dict:
        result = subprocess.run(
            [apexdsp, "evaluate", "--program", "vanilla", "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"),
             "--limit", str(limit), "--threads", "2", "--no-track", "--json", "--resume", str(progress)],
            capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert evaluate(2)["n"] == 2
    first_rows = progress.read_text().splitlines()
    summary = evaluate(3)
    assert summary["n"] == 3 and summary["lm_calls"] == 1.0
    rows = progress.read_text().splitlines()
    assert rows[:2] == first_rows and len(rows) == 3  # the two finished questions were not run again
