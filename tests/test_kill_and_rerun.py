"""Being killed loses nothing: real ``apexdsp`` commands are SIGKILLed at named and seeded-random points and
run again; the rerun must finish, give what an uninterrupted run gives, read no half-written file, leave no
MLflow run RUNNING and report no unfinished step as done.

The default tests kill each command at one or two points; the sweep over more seeds and points is marked
``kill_long`` (``pytest -m kill_long tests/test_kill_and_rerun.py``). With ``-s`` the session prints the
table of kill_harness.KillTable; it writes it as ``kill_table.json`` in pytest's base temp folder, and to
the file ``APEXDSP_KILL_REPORT`` names when that is set.
The tiny random Llama decodes greedily on one torch thread and one question at a time, so its answers are
the same run after run (the CLI offers no dtype switch: on a CPU with bfloat16 it decodes in bfloat16).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiment_fixtures import SFT_STAGE, write_tiny_experiment
from kill_checks import Baseline, check, env_for, record
from kill_harness import (APEXDSP, Finished, KillPoint, Outcome, aged_point, broken_json, check_states,
                          compiled_program, delay_points, jsonl_rows, parses, path_point, resumed_without_training,
                          run_and_kill, run_to_end, running_runs, same_program, step_results, step_runs)

pytestmark = pytest.mark.slow
QUESTIONS = 12


# -- apexdsp evaluate --resume ---------------------------------------------------------------------------------

def evaluate_argv(model: Path, data_dir: Path, progress: Path) -> list[str]:
    return [APEXDSP, "evaluate", "--program", "vanilla", "--lm", str(model), "--questions",
            str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", str(QUESTIONS), "--threads", "1",
            "--resume", str(progress), "--no-track", "--json"]


def answers(finished: Finished) -> list[tuple]:
    report = json.loads(Path(finished.last_json()["results_file"]).read_text())
    return [(r["id"], r["prediction"], r["em"], r["f1"]) for r in report["results"]]


@pytest.fixture(scope="session")
def evaluate_baseline(tiny_model_dir, data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate-baseline")
    done = run_to_end(evaluate_argv(tiny_model_dir, data_dir, folder / "progress.jsonl"), env_for(folder),
                      folder, "baseline")
    assert done.returncode == 0, done.stderr[-2000:]
    return Baseline({"answers": answers(done)}, done.seconds)


def answered_point(progress: Path, rows: int) -> KillPoint:
    """Kill once ``rows`` answers are in the progress file (its header is the line before them)."""
    return path_point(f"{rows} answers written", progress.parent, progress.name,
                      lambda path: len(jsonl_rows(path)) > rows)


def kill_evaluate(folder: Path, point: KillPoint, model: Path, data_dir: Path, baseline: Baseline) -> Outcome:
    progress = folder / "progress.jsonl"
    argv, env = evaluate_argv(model, data_dir, progress), env_for(folder)
    killed = run_and_kill(argv, env, point, folder, "killed")
    kept = [row["result"]["id"] for row in jsonl_rows(progress) if "result" in row]
    rerun = run_to_end(argv, env, folder, "rerun")
    notes, lost, got = [], len(broken_json(folder)), None
    if rerun.returncode == 0:
        try:
            got = answers(rerun)
        except (ValueError, KeyError, OSError) as error:
            lost, notes = lost + 1, [f"results file unreadable: {error}"]
    ids = [row["result"]["id"] for row in jsonl_rows(progress) if "result" in row]
    if ids[:len(kept)] != kept:
        lost, notes = lost + 1, notes + ["answers kept before the kill are gone from the progress file"]
    if len(ids) != len(set(ids)):
        notes.append("questions answered twice")
    if rerun.returncode == 0 and len(set(ids)) != QUESTIONS:
        lost, notes = lost + 1, notes + [f"progress file holds {len(set(ids))} of {QUESTIONS} answers"]
    outcome = record("evaluate --resume", point.label, killed, rerun, got == baseline.value["answers"], lost, [],
                     folder, notes, f"{len(kept)} answers kept")
    assert len(ids) == len(set(ids)), f"a finished question ran again after the kill: {outcome}"
    return outcome


def test_an_evaluation_killed_part_way_resumes_to_the_same_answers(tmp_path, tiny_model_dir, data_dir,
                                                                  evaluate_baseline, kill_table):
    progress = tmp_path / "named" / "progress.jsonl"
    check(kill_evaluate(tmp_path / "named", answered_point(progress, 4), tiny_model_dir, data_dir,
                        evaluate_baseline))
    (point,) = delay_points(0, evaluate_baseline.seconds)
    check(kill_evaluate(tmp_path / "random", point, tiny_model_dir, data_dir, evaluate_baseline), drawn=True)


@pytest.mark.kill_long
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sweep_evaluate_at_seeded_random_points(seed, tmp_path, tiny_model_dir, data_dir, evaluate_baseline,
                                                kill_table):
    outcomes = [kill_evaluate(tmp_path / str(number), point, tiny_model_dir, data_dir, evaluate_baseline)
                for number, point in enumerate(delay_points(seed, evaluate_baseline.seconds, count=2))]
    for outcome in sorted(outcomes, key=lambda o: not o.killed):
        check(outcome, drawn=True)


@pytest.mark.kill_long
@pytest.mark.parametrize("rows", [0, 1, 11])
def test_sweep_evaluate_at_named_points(rows, tmp_path, tiny_model_dir, data_dir, evaluate_baseline, kill_table):
    point = (path_point("progress header written", tmp_path, "progress.jsonl") if rows == 0
             else answered_point(tmp_path / "progress.jsonl", rows))
    check(kill_evaluate(tmp_path, point, tiny_model_dir, data_dir, evaluate_baseline))


# -- apexdsp compile with a GRPO stage --------------------------------------------------------------------------

def compile_argv(model: Path, data_dir: Path, out: Path) -> list[str]:
    return [APEXDSP, "compile", "--program", "vanilla", "--optimizer", "grpo(generate_answer:answer)", "--lm",
            str(model), "--trainset", str(data_dir / "hotpotqa" / "train.jsonl"), "--limit-train", "4",
            "--grpo-steps", "3", "--grpo-beta", "0", "--out", str(out), "--no-track", "--json"]


@pytest.fixture(scope="session")
def compile_baseline(tiny_model_dir, data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile-baseline")
    done = run_to_end(compile_argv(tiny_model_dir, data_dir, folder / "out"), env_for(folder), folder, "baseline")
    assert done.returncode == 0, done.stderr[-2000:]
    return Baseline(compiled_program(folder / "out"), done.seconds)


def grpo_work(folder: Path) -> Path:
    return folder / ".out.stages" / "grpo" / "generate_answer"


def complete_checkpoint(folder: Path) -> KillPoint:
    return path_point("checkpoint complete", grpo_work(folder) / "checkpoints", "checkpoint-*/trainer_state.json",
                      parses)


def kill_compile(folder: Path, point: KillPoint, model: Path, data_dir: Path, baseline: Baseline,
                 after_kill=None) -> Outcome:
    """Kill a compile at ``point`` (then let ``after_kill(folder)`` damage what a kill could), rerun it."""
    argv, env = compile_argv(model, data_dir, folder / "out"), env_for(folder)
    killed = run_and_kill(argv, env, point, folder, "killed")
    checkpoints = sorted(p.name for p in (grpo_work(folder) / "checkpoints").glob("checkpoint-*"))
    if after_kill is not None:
        after_kill(folder)
    rerun = run_to_end(argv, env, folder, "rerun")
    notes, lost, equal = [], len(broken_json(folder)), False
    if rerun.returncode == 0:
        try:
            equal = same_program(compiled_program(folder / "out"), baseline.value)
        except Exception as error:  # an unreadable or incomplete program is what this test looks for
            lost, notes = lost + 1, [f"compiled program unusable: {type(error).__name__}: {error}"]
        if (grpo_work(folder) / "checkpoints").exists():
            notes.append("checkpoints left after the weights were saved")
    state = f"checkpoints {checkpoints}" if checkpoints else "no checkpoint"
    return record("compile grpo", point.label, killed, rerun, equal, lost, [], folder, notes, state)


def test_a_grpo_compile_killed_after_its_checkpoint_resumes_from_it(tmp_path, tiny_model_dir, data_dir,
                                                                    compile_baseline, kill_table):
    check(kill_compile(tmp_path, complete_checkpoint(tmp_path), tiny_model_dir, data_dir, compile_baseline))
    assert resumed_without_training(tmp_path / "rerun.err")


@pytest.mark.kill_long
@pytest.mark.parametrize("where", ["training started", "checkpoint folder created", "weights being saved",
                                   "weights saved", "seed 1", "seed 2"])
def test_sweep_grpo_compile(where, tmp_path, tiny_model_dir, data_dir, compile_baseline, kill_table):
    points = {"training started": path_point(where, grpo_work(tmp_path), "prompts.json"),
              "checkpoint folder created": path_point(where, grpo_work(tmp_path) / "checkpoints", "checkpoint-*"),
              "weights being saved": path_point(where, tmp_path, ".out.stages/weights/.generate_answer-*"),
              "weights saved": path_point(where, tmp_path, ".out.stages/weights/*/apexdsp-trained.json")}
    point = points.get(where) or delay_points(int(where.split()[1]), compile_baseline.seconds)[0]
    check(kill_compile(tmp_path, point, tiny_model_dir, data_dir, compile_baseline), drawn=where not in points)


@pytest.mark.kill_long
def test_a_checkpoint_cut_off_while_its_trainer_state_was_written_is_not_resumed_from(
        tmp_path, tiny_model_dir, data_dir, compile_baseline, kill_table):
    """transformers writes ``trainer_state.json`` last, in place (``open('w')`` then ``write``): a kill between
    the two leaves the checkpoint with an empty state file, which is what this test leaves before the rerun."""

    def cut_off(folder: Path) -> None:
        for state in (grpo_work(folder) / "checkpoints").glob("checkpoint-*/trainer_state.json"):
            state.write_text("")

    check(kill_compile(tmp_path, complete_checkpoint(tmp_path), tiny_model_dir, data_dir, compile_baseline,
                       after_kill=cut_off))


# -- apexdsp run SPEC ---------------------------------------------------------------------------------------------

def write_spec(folder: Path, data_dir: Path, model: Path, extra: str) -> Path:
    """The tiny rag experiment on the tiny Llama, one question at a time (greedy answers do not depend on it)."""
    spec = write_tiny_experiment(folder, data_dir, extra=extra.format(model=model))
    spec.write_text(spec.read_text().replace("threads = 4", "threads = 1"))
    return spec


def run_argv(spec: Path, cache: Path, *extra: str) -> list[str]:
    return [APEXDSP, "run", str(spec), "--cache-dir", str(cache), *extra]


def spec_baseline(tmp_path_factory, data_dir: Path, model: Path, extra: str) -> tuple[Path, Baseline]:
    folder = tmp_path_factory.mktemp("run-baseline")
    spec = write_spec(folder / "spec", data_dir, model, extra)
    done = run_to_end(run_argv(spec, folder / "cache", "--no-track"), env_for(folder), folder, "baseline")
    assert done.returncode == 0, done.stderr[-2000:]
    return spec, Baseline(step_results(folder / "cache"), done.seconds)


@pytest.fixture(scope="session")
def rag_run(tmp_path_factory, data_dir, tiny_model_dir):
    return spec_baseline(tmp_path_factory, data_dir, tiny_model_dir, '\n[lm]\ndefault = "{model}"\n')


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, data_dir, tiny_model_dir):
    return spec_baseline(tmp_path_factory, data_dir, tiny_model_dir, SFT_STAGE)


def kill_run(command: str, folder: Path, spec: Path, point: KillPoint, baseline: Baseline,
             track: bool = False) -> Outcome:
    """Kill ``apexdsp run`` at ``point``; ``--check`` must not call a step without result.json done; rerun."""
    cache = folder / "cache"
    argv, env = run_argv(spec, cache, *([] if track else ["--no-track"])), env_for(folder)
    killed = run_and_kill(argv, env, point, folder, "killed")
    started = {p.name for p in cache.glob("*-*") if p.is_dir() and p.parent == cache}
    unfinished = {name for name in started if not (cache / name / "result.json").is_file()}
    states = check_states(spec, cache, folder)
    notes = [f"--check calls {key} done without result.json" for key in unfinished
             if states.get(key, "").startswith("done")]
    notes += [f"--check calls {key} '{state}' although it has result.json" for key, state in states.items()
              if key in started - unfinished and state != "done"]
    rerun = run_to_end(argv, env, folder, "rerun")
    lost, equal = len(broken_json(folder)), False
    if rerun.returncode == 0:
        missing = [key for key in baseline.value if not (cache / key / "result.json").is_file()]
        lost += len(missing)
        if not missing:
            equal = step_results(cache) == baseline.value
        for key in unfinished:  # a step killed part-way counts both attempts
            attempts = json.loads((cache / key / "result.json").read_text())["attempts"]
            if (cache / key / "clock.json").is_file() and attempts < 2:
                notes.append(f"{key} was killed part-way but records {attempts} attempt")
    running = []
    try:
        running = running_runs(env["MLFLOW_TRACKING_URI"]) if track else []
    except Exception as error:  # a store no client can open: every run in it is lost to its readers
        failure = error_line(f"{type(error).__name__}: {error}")[:300]
        lost, notes = lost + 1, notes + [f"MLflow store unreadable: {failure}"]
    state = ", ".join(f"{key}: {states.get(key)}" for key in sorted(unfinished)) or "no step in progress"
    return record(command, point.label, killed, rerun, equal, lost, running, folder, notes, state)


def check_run(outcome: Outcome, drawn: bool = False) -> None:
    """:func:`check`, and ``--check`` told unfinished steps from done ones, and a resumed step counts both attempts."""
    assert not [n for n in outcome.notes if "--check" in n or "attempt" in n], outcome
    assert drawn or "in progress" in outcome.point, f"the kill was meant to land inside a step: {outcome}"
    check(outcome, drawn)


def first_evaluation_started(cache: Path) -> KillPoint:
    return path_point("first evaluation started", cache, "evaluate-*/clock.json")


def test_an_experiment_killed_inside_a_step_resumes_and_reports_the_same_scores(tmp_path, rag_run, kill_table):
    spec, baseline = rag_run
    check_run(kill_run("run rag", tmp_path, spec, first_evaluation_started(tmp_path / "cache"), baseline))


def test_a_tracked_experiment_killed_inside_a_step_leaves_no_run_running(tmp_path, rag_run, kill_table):
    """The step's run is resumed, not replaced: one finished run per step."""
    spec, baseline = rag_run
    check_run(kill_run("run rag, tracked", tmp_path, spec, first_evaluation_started(tmp_path / "cache"), baseline,
                       track=True))
    assert step_runs(env_for(tmp_path)["MLFLOW_TRACKING_URI"]) == {key: ["FINISHED"] for key in baseline.value}


@pytest.mark.kill_long
@pytest.mark.parametrize("track", [False, True], ids=["untracked", "tracked"])
def test_an_sft_stage_killed_while_training_resumes_to_the_same_weights(track, tmp_path, sft_run, kill_table):
    """Tracked, the stage's own run (nested in the step's) is left RUNNING by the kill, and ended by the rerun."""
    spec, baseline = sft_run
    point = path_point("SFT training started", tmp_path / "cache", "compile-*/sft/*")
    check_run(kill_run("run rag+sft" + (", tracked" if track else ""), tmp_path, spec, point, baseline, track=track))


@pytest.mark.kill_long
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("variant", ["rag", "sft"])
def test_sweep_run_at_seeded_random_points(variant, seed, tmp_path, rag_run, sft_run, kill_table):
    spec, baseline = rag_run if variant == "rag" else sft_run
    (point,) = delay_points(seed, baseline.seconds)
    check_run(kill_run(f"run {variant}", tmp_path, spec, point, baseline), drawn=True)


@pytest.mark.kill_long
@pytest.mark.parametrize("seed", [1, 2])
def test_sweep_tracked_run_at_seeded_random_points(seed, tmp_path, rag_run, kill_table):
    spec, baseline = rag_run
    (point,) = delay_points(seed, baseline.seconds)
    check_run(kill_run("run rag, tracked", tmp_path, spec, point, baseline, track=True), drawn=True)


@pytest.mark.kill_long
@pytest.mark.parametrize("after", [0.5, 1.0, 2.0])
def test_sweep_tracked_run_killed_while_mlflow_creates_its_store(after, tmp_path, rag_run, kill_table):
    """The first tracked command creates the sqlite store (MLflow's schema and migrations: seconds here), under
    a temporary name (``.mlflow.db.*.tmp``) or, were it built in place, as ``mlflow.db`` itself."""
    spec, baseline = rag_run
    point = aged_point(f"{after}s into the store's creation", tmp_path, "*mlflow.db*", after)
    check_run(kill_run("run rag, tracked", tmp_path, spec, point, baseline, track=True), drawn=True)

