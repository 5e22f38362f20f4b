"""``apexdsp compile`` with the bootstrap optimizer killed and run again: the rerun resumes from the compile's
checkpoint (``.<out>.checkpoint.json``: each teacher question, the pooled demos, each candidate's score) and
saves the program an uninterrupted compile saves, its report included; the checkpoint is gone after it.

The closed-book program is compiled on SmolLM2-135M (the tiny random Llama writes no words, and an output
without words never becomes a demo), one question at a time, greedily, so its answers repeat run after run:
three training questions, two validation questions, two candidate demo sets and the zero-shot program.
Tracked, the compile's run and its bootstrap's run are what a kill leaves RUNNING. The sweep over more
points is marked ``kill_long``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kill_checks import Baseline, check, env_for, record
from kill_harness import (APEXDSP, KillPoint, Outcome, broken_json, delay_points, path_point, run_and_kill, run_to_end,
                          running_runs)

pytestmark = pytest.mark.slow
LM = "smollm2-135m"
# Report fields that depend on time, or on whether the compile was resumed.
TIMED = {"bootstrap_seconds", "selection_seconds", "teacher_resumed"}


def bootstrap_argv(data_dir: Path, out: Path, track: bool = False) -> list[str]:
    return [APEXDSP, "compile", "--program", "vanilla", "--optimizer", "bootstrap", "--lm", LM,
            "--trainset", str(data_dir / "hotpotqa" / "train.jsonl"), "--limit-train", "3",
            "--valset", str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit-val", "2", "--candidates", "2",
            "--max-demos", "1", "--min-answer-f1", "0", "--min-final-answer-f1", "0", "--threads", "1",
            "--out", str(out), "--json", *([] if track else ["--no-track"])]


def bootstrapped_program(out: Path) -> dict:
    """What a compile must reproduce: the saved state (demos, instructions) and the manifest, less its times."""
    from apexdsp.optimizers.compiled import read_manifest

    manifest = read_manifest(out)
    report = {k: v for k, v in manifest.optimizer["report"].items() if k not in TIMED}
    report["candidates"] = [{k: v for k, v in c.items() if k != "seconds"} for c in report["candidates"]]
    return {"state": json.loads((out / "program.json").read_text()), "program": manifest.program,
            "options": manifest.program_options, "predictors": manifest.predictors,
            "modules": {name: b.model_dump() for name, b in manifest.modules.items()}, "lm": manifest.lm,
            "data": {name: ref.model_dump() for name, ref in manifest.data.items()},
            "config": manifest.optimizer["config"], "report": report}


@pytest.fixture(scope="session")
def bootstrap_baseline(data_dir, tmp_path_factory) -> Baseline:
    folder = tmp_path_factory.mktemp("bootstrap-baseline")
    done = run_to_end(bootstrap_argv(data_dir, folder / "out"), env_for(folder), folder, "baseline")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.last_json()["demos"], "no demo passed the gates: the kills would test an empty compile"
    return Baseline(bootstrapped_program(folder / "out"), done.seconds)


def checkpoint_of(folder: Path) -> Path:
    return folder / ".out.checkpoint.json"


def saved_phase(folder: Path, label: str, reached) -> KillPoint:
    """Kill once the checkpoint parses and ``reached(state)`` holds of it."""

    def check_state(path: Path) -> bool:
        try:
            return reached(json.loads(path.read_text()))
        except (OSError, ValueError):
            return False

    return path_point(label, folder, checkpoint_of(folder).name, check_state)


def points(folder: Path, candidates: int) -> dict[str, KillPoint]:
    """The named points of a compile, in order (``candidates``: how many the baseline scored, zero-shot in).
    The last two are windows of milliseconds (the save, then the checkpoint's removal, follow at once)."""
    return {name: saved_phase(folder, name, reached) for name, reached in {
        "one teacher question judged": lambda s: len(s["teacher"]) >= 1,
        "teacher pass done": lambda s: s["bootstrap"] is not None,
        "zero-shot scored": lambda s: "-1" in s["candidates"],
        "every candidate scored": lambda s: len(s["candidates"]) == candidates}.items()} | {
        "program saved": path_point("program saved", folder, "out/apexdsp-compiled.json")}


WINDOWS = ("every candidate scored", "program saved")


def kill_compile(folder: Path, point: KillPoint, data_dir: Path, baseline: Baseline, track: bool = False,
                 after_kill=None) -> Outcome:
    """Kill a compile at ``point`` (then let ``after_kill(folder, killed)`` leave what a kill could), rerun."""
    argv, env = bootstrap_argv(data_dir, folder / "out", track), env_for(folder)
    killed = run_and_kill(argv, env, point, folder, "killed")
    saved = json.loads(checkpoint_of(folder).read_text()) if checkpoint_of(folder).is_file() else None
    if after_kill is not None:
        after_kill(folder, killed)
    rerun = run_to_end(argv, env, folder, "rerun")
    notes, lost, equal = [], len(broken_json(folder)), False
    if rerun.returncode == 0:
        try:
            equal = bootstrapped_program(folder / "out") == baseline.value
        except Exception as error:  # an unreadable or incomplete program is what this test looks for
            lost, notes = lost + 1, [f"compiled program unusable: {type(error).__name__}: {error}"]
        if checkpoint_of(folder).exists():
            notes.append("the checkpoint is left after the program was saved")
        if saved and saved["teacher"] and "judged before the compile was interrupted" not in rerun.stderr:
            notes.append("the rerun ran the teacher pass again from the start")
    running = running_runs(env["MLFLOW_TRACKING_URI"]) if track else []
    state = ("no checkpoint" if saved is None else f"checkpoint: {len(saved['teacher'])} teacher questions, "
             f"bootstrap {'done' if saved['bootstrap'] else 'not done'}, {len(saved['candidates'])} candidates")
    return record("compile bootstrap" + (", tracked" if track else ""), point.label, killed, rerun, equal, lost,
                  running, folder, notes, state)


def check_compile(outcome: Outcome, drawn: bool = False) -> None:
    """:func:`check`, and the rerun resumed what the checkpoint held and removed the checkpoint once saved."""
    assert not [n for n in outcome.notes if "checkpoint" in n or "again" in n], outcome
    check(outcome, drawn)


def test_a_bootstrap_compile_killed_after_its_teacher_pass_resumes_to_the_same_program(
        tmp_path, data_dir, bootstrap_baseline, kill_table):
    point = points(tmp_path, 0)["teacher pass done"]
    check_compile(kill_compile(tmp_path, point, data_dir, bootstrap_baseline))
    assert "bootstrap: resumed from" in (tmp_path / "rerun.err").read_text()


@pytest.mark.kill_long
@pytest.mark.parametrize("where", ["one teacher question judged", "teacher pass done", "zero-shot scored",
                                   "every candidate scored", "program saved", "seed 1", "seed 2", "seed 3"])
def test_sweep_bootstrap_compile(where, tmp_path, data_dir, bootstrap_baseline, kill_table):
    named = points(tmp_path, len(bootstrap_baseline.value["report"]["candidates"]))
    point = named.get(where) or delay_points(int(where.split()[1]), bootstrap_baseline.seconds)[0]
    check_compile(kill_compile(tmp_path, point, data_dir, bootstrap_baseline),
                  drawn=where not in named or where in WINDOWS)


@pytest.mark.kill_long
def test_a_compile_killed_while_saving_its_program_leaves_no_staging_folder(tmp_path, data_dir, bootstrap_baseline,
                                                                            kill_table):
    """The save writes the program into ``.out.tmp-<pid>`` and renames it to ``out``: a window of milliseconds,
    so the test kills while the candidates are scored and leaves the half-written staging folder that a kill
    inside the save leaves, named by the killed process."""

    def cut_off(folder: Path, killed) -> None:
        staging = folder / f".out.tmp-{killed.pid}"
        staging.mkdir()
        (staging / "program.json").write_text('{"generate_answer": {"demos": [')

    point = points(tmp_path, len(bootstrap_baseline.value["report"]["candidates"]))["zero-shot scored"]
    check_compile(kill_compile(tmp_path, point, data_dir, bootstrap_baseline, after_kill=cut_off))


@pytest.mark.kill_long
@pytest.mark.parametrize("where", ["one teacher question judged", "zero-shot scored"])
def test_a_tracked_bootstrap_compile_killed_leaves_no_run_running(where, tmp_path, data_dir, bootstrap_baseline,
                                                                 kill_table):
    """The kill leaves the compile's run and its bootstrap's run RUNNING; the rerun ends them as KILLED."""
    point = points(tmp_path, len(bootstrap_baseline.value["report"]["candidates"]))[where]
    check_compile(kill_compile(tmp_path, point, data_dir, bootstrap_baseline, track=True))
