"""Two commands at once on one ``APEXDSP_HOME``: each finishes with what it gives alone, no step is computed
twice, and the one MLflow store they share (``<home>/mlflow.db``, created by whichever comes first) ends with
every run FINISHED.

- The same experiment twice: the second is refused at once (the experiment's lock), the first finishes.
- Two experiments sharing their steps (the same spec under two names, as a data set's specs share an
  encoder and an index): each step is computed by one of them while the other waits on the step's lock,
  then reused; both log every step.
- ``apexdsp evaluate`` beside ``apexdsp compile`` (bootstrap): one store, one DSPy cache, one runs folder
  (on demand with ``-m kill_long``: both commands run alone first, then together).

The commands run on the tests' tiny fixtures (the tiny rag experiment, the kill tests' evaluation and
bootstrap compile), in a home of their own; the converted SmolLM2 is linked into it, not converted again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from kill_harness import (APEXDSP, Finished, command_env, jsonl_rows, leftover_temps, run_to_end, running_runs,
                          step_results, step_runs)
from test_kill_and_rerun import answers, evaluate_argv, run_argv, write_spec
from test_kill_bootstrap_compile import LM, bootstrap_argv, bootstrapped_program

pytestmark = pytest.mark.slow
# Set by conftest for the tests' own process; a command on a home of its own must find its defaults there.
OWN_DEFAULTS = ("MLFLOW_TRACKING_URI", "APEXDSP_RUNS", "TORCH_EXTENSIONS_DIR", "DSPY_CACHEDIR")


def shared_home(folder: Path) -> tuple[Path, dict[str, str]]:
    """A fresh ``APEXDSP_HOME`` (store, runs, step cache, DSPy cache inside it) and the commands' environment."""
    from apexdsp.lm.gguf_models import ensure_converted

    home = folder / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / LM).symlink_to(ensure_converted(LM), target_is_directory=True)
    base = {k: v for k, v in os.environ.items() if k not in OWN_DEFAULTS}
    return home, command_env(base, APEXDSP_HOME=str(home))


def start(argv: list[str], env: dict[str, str], folder: Path, name: str) -> tuple[subprocess.Popen, float]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
        return subprocess.Popen(argv, env=env, cwd=folder, stdout=out, stderr=err), time.monotonic()


def finish(process: subprocess.Popen, started: float, folder: Path, name: str, timeout: float = 600) -> Finished:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
    return Finished(code, (folder / f"{name}.out").read_text(), (folder / f"{name}.err").read_text(),
                    time.monotonic() - started)


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def store_of(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


# -- two experiments ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lone_rag(tmp_path_factory, data_dir, tiny_model_dir) -> tuple[Path, dict]:
    """The tiny rag experiment (spec and data), and the step results of one run of it alone."""
    folder = tmp_path_factory.mktemp("lone-rag")
    spec = write_spec(folder / "spec", data_dir, tiny_model_dir, '\n[lm]\ndefault = "{model}"\n')
    home, env = shared_home(folder)
    done = run_to_end([APEXDSP, "run", str(spec), "--no-track"], env, folder, "lone")
    assert done.returncode == 0, done.stderr[-2000:]
    return spec, step_results(home / "experiments")


def test_the_same_experiment_started_twice_runs_once(tmp_path, lone_rag):
    spec, alone = lone_rag
    home, env = shared_home(tmp_path)
    first = start([APEXDSP, "run", str(spec)], env, tmp_path, "first")
    lock = home / "experiments" / "locks" / "tiny-rag.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().startswith("pid"))
    second = finish(*start([APEXDSP, "run", str(spec)], env, tmp_path, "second"), tmp_path, "second")
    assert second.returncode == 2 and "error: experiment 'tiny-rag' is already running" in second.stderr
    assert "Traceback" not in second.stderr
    first = finish(*first, tmp_path, "first")
    assert first.returncode == 0, first.stderr[-2000:]
    assert step_results(home / "experiments") == alone
    assert step_runs(store_of(home)) == {key: ["FINISHED"] for key in alone}
    again = run_to_end([APEXDSP, "run", str(spec), "--json"], env, tmp_path, "again")
    assert again.returncode == 0 and {s["status"] for s in again.last_json()["steps"]} == {"cached"}


def test_two_experiments_sharing_their_steps_compute_each_step_once(tmp_path, lone_rag):
    spec, alone = lone_rag
    twin = spec.with_name("tiny-rag-twin.toml")
    twin.write_text(spec.read_text().replace('name = "tiny-rag"', 'name = "tiny-rag-twin"'))
    home, env = shared_home(tmp_path)
    runs = [start([APEXDSP, "run", str(path), "--json"], env, tmp_path, path.stem) for path in (spec, twin)]
    done = [finish(*run, tmp_path, path.stem) for run, path in zip(runs, (spec, twin))]
    for finished in done:
        assert finished.returncode == 0, finished.stderr[-2000:]
    cache = home / "experiments"
    assert step_results(cache) == alone
    statuses: dict[str, list[str]] = {}
    for finished in done:
        for step in finished.last_json()["steps"]:
            statuses.setdefault(step["key"], []).append(step["status"])
    assert {key: sorted(found) for key, found in statuses.items()} == {key: ["cached", "computed"] for key in alone}
    assert all(json.loads((cache / key / "result.json").read_text())["attempts"] == 1 for key in alone)
    assert any("another experiment is computing this step" in finished.stderr for finished in done), \
        "the two experiments did not run at once"
    assert step_runs(store_of(home)) == {key: ["FINISHED", "FINISHED"] for key in alone}  # one per experiment
    assert not running_runs(store_of(home)) and not leftover_temps(home)


# -- an evaluation beside a compile ------------------------------------------------------------------------------

def evaluate_and_compile(folder: Path, data_dir: Path, model: Path) -> tuple[list[str], list[str]]:
    evaluate = [arg for arg in evaluate_argv(model, data_dir, folder / "progress.jsonl") if arg != "--no-track"]
    return evaluate, [arg for arg in bootstrap_argv(data_dir, folder / "out") if arg != "--no-track"]


@pytest.mark.kill_long
def test_an_evaluation_beside_a_compile_gives_what_each_gives_alone(tmp_path, data_dir, tiny_model_dir):
    alone_dir, both_dir = tmp_path / "alone", tmp_path / "both"
    _, alone_env = shared_home(alone_dir)
    evaluate, compile_ = evaluate_and_compile(alone_dir, data_dir, tiny_model_dir)
    lone = {name: run_to_end(argv, alone_env, alone_dir, name) for name, argv in
            (("evaluate", evaluate), ("compile", compile_))}
    assert all(done.returncode == 0 for done in lone.values()), {n: d.stderr[-2000:] for n, d in lone.items()}

    home, env = shared_home(both_dir)
    evaluate, compile_ = evaluate_and_compile(both_dir, data_dir, tiny_model_dir)
    started = {name: start(argv, env, both_dir, name) for name, argv in (("evaluate", evaluate),
                                                                          ("compile", compile_))}
    both = {name: finish(*process, both_dir, name) for name, process in started.items()}
    assert all(done.returncode == 0 for done in both.values()), {n: d.stderr[-2000:] for n, d in both.items()}
    assert answers(both["evaluate"]) == answers(lone["evaluate"])
    assert bootstrapped_program(both_dir / "out") == bootstrapped_program(alone_dir / "out")
    assert len({row["result"]["id"] for row in jsonl_rows(both_dir / "progress.jsonl") if "result" in row}) == 12
    runs = {done.last_json().get("mlflow_run_id") for done in both.values()}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_of(home))
    assert None not in runs and {client.get_run(run).info.status for run in runs} == {"FINISHED"}
    assert not running_runs(store_of(home)) and not leftover_temps(home)
    assert not list(both_dir.glob(".out*")), "the compile's checkpoint or staging folder was left behind"
