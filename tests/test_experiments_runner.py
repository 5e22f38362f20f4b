"""The runner for real: rag over a BM25 index of real paragraphs, SmolLM2-135M, DSPy's LabeledFewShot stage.

Two test questions keep each run to seconds; the assertions are about the runner's contract: steps cached by
content hash, a finished experiment re-run does no work, a failed step resumes, one run at a time, a stage
whose optimizer is missing fails clearly, and results computed without MLflow are logged later.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from apexdsp.errors import ApexError
from apexdsp.experiments.runner import ExperimentRunner, experiment_lock, step_lock
from apexdsp.experiments.spec import load_spec
from experiment_fixtures import SFT_STAGE, write_tiny_experiment

pytestmark = pytest.mark.slow


def runner_for(spec_path, cache):
    return ExperimentRunner(load_spec(spec_path), spec_path, cache_root=cache)


def evaluation_runs(experiment: str):
    found = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    return [run for run in found if run.data.tags.get("apexdsp.step") == "evaluate"]


def test_run_logs_parent_and_children_then_a_rerun_does_no_work(tmp_path, data_dir):
    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir)
    cache = tmp_path / "cache"
    summary = runner_for(spec_path, cache).run()
    assert [(s.kind, s.label, s.status) for s in summary.steps] == [
        ("evaluate", "uncompiled", "computed"), ("compile", "labeled", "computed"), ("evaluate", "labeled", "computed")]
    for step in summary.steps:  # every step: artifacts, then result.json, in its own content-keyed folder
        result = json.loads((cache / step.key / "result.json").read_text())
        assert result["key"] == step.key and result["kind"] == step.kind
    assert (cache / summary.steps[1].key / "program" / "program.json").is_file()
    state = json.loads((cache / summary.steps[1].key / "program" / "program.json").read_text())
    assert len(state["reader.generate"]["demos"]) == 2  # the stage really attached demos
    report = json.loads((cache / summary.steps[0].key / "report.json").read_text())
    assert report["n"] == 2 and 0 <= report["f1"] <= 1 and report["hit"] is not None

    parent = mlflow.get_run(summary.parent_run_id)
    assert parent.data.tags["apexdsp.kind"] == "experiment" and parent.data.params["program"] == "rag"
    assert "em/labeled" in parent.data.metrics
    children = mlflow.search_runs(experiment_names=["tiny"], output_format="list",
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    assert sorted(c.data.tags["apexdsp.label"] for c in children) == ["labeled", "labeled", "uncompiled"]
    runs_before = len(mlflow.search_runs(experiment_names=["tiny"], output_format="list"))

    again = runner_for(spec_path, cache).run()
    assert {s.status for s in again.steps} == {"cached"}
    assert again.parent_run_id == summary.parent_run_id
    assert len(mlflow.search_runs(experiment_names=["tiny"], output_format="list")) == runs_before


def test_a_failed_step_resumes_without_redoing_finished_ones(tmp_path, data_dir, monkeypatch):
    from apexdsp.experiments import steps

    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir)
    cache = tmp_path / "cache"
    real = steps.EvaluateStep.run
    calls = []

    def interrupted(self, context, work_dir):
        calls.append(self.label)
        if self.label == "labeled" and calls.count("labeled") == 1:
            raise KeyboardInterrupt  # killed in the middle of the last step
        return real(self, context, work_dir)

    monkeypatch.setattr(steps.EvaluateStep, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner_for(spec_path, cache).run()
    parent_runs = [r for r in mlflow.search_runs(experiment_names=["tiny"], output_format="list")
                   if r.data.tags.get("apexdsp.kind") == "experiment"]
    assert len(parent_runs) == 1 and parent_runs[0].info.status == "FAILED"
    interrupted_runner = runner_for(spec_path, cache)
    assert [interrupted_runner.state(step) for step in interrupted_runner.steps] == [
        "done", "done", "in progress: 0 min of work in 1 attempt"]

    summary = runner_for(spec_path, cache).run()
    assert [s.status for s in summary.steps] == ["cached", "cached", "computed"]
    assert calls == ["uncompiled", "labeled", "labeled"]
    attempts = [json.loads((cache / s.key / "result.json").read_text())["attempts"] for s in summary.steps]
    assert attempts == [1, 1, 2]  # the step's seconds count the interrupted attempt too (StepClock)
    resumed = json.loads((cache / summary.steps[2].key / "result.json").read_text())
    # An evaluation's seconds are the step's active time over both attempts, not the report's wall clock.
    assert resumed["metrics"]["seconds"] == resumed["seconds"] > 0
    assert resumed["metrics"]["seconds_per_question"] == resumed["seconds"] / resumed["metrics"]["n"]
    assert summary.parent_run_id == parent_runs[0].info.run_id  # the same parent run, now finished
    assert mlflow.get_run(summary.parent_run_id).info.status == "FINISHED"
    statuses = sorted(r.info.status for r in evaluation_runs("tiny"))
    assert statuses.count("FINISHED") == 2 and len(statuses) == 3  # the interrupted one stays FAILED


def test_two_runs_of_one_experiment_cannot_overlap(tmp_path, data_dir):
    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir)
    cache = tmp_path / "cache"
    with experiment_lock(cache, "tiny-rag"):
        with pytest.raises(ApexError, match=r"experiment 'tiny-rag' is already running \(pid \d+"):
            runner_for(spec_path, cache).run()
    assert not any(cache.glob("evaluate-*"))  # nothing was computed by the refused run


def test_two_experiments_sharing_a_step_compute_it_once(tmp_path, data_dir):
    """Two experiments started together (the four specs of a data set share the encoder and index): the second
    waits on the step's lock, then reuses what the first computed instead of computing it into the same folder."""
    specs = [write_tiny_experiment(tmp_path / name, data_dir, name=name) for name in ("tiny-rag", "tiny-twin")]
    cache = tmp_path / "cache"
    shared = runner_for(specs[0], cache).steps[0]
    assert shared.key == runner_for(specs[1], cache).steps[0].key  # same questions, index and program
    command = [str(Path(sys.executable).parent / "apexdsp"), "run", "--no-track", "--cache-dir", str(cache)]
    logs = [tmp_path / f"{spec.stem}.log" for spec in specs]  # files, not pipes: a full pipe would block a run
    with step_lock(cache, shared.key, on_wait=lambda holder: None):  # held here until both are waiting
        runs = [subprocess.Popen([*command, str(spec)], stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                 env={**os.environ, "COLUMNS": "200"}) for spec, log in zip(specs, logs)]
        deadline = time.monotonic() + 240
        while not all(_waiting(cache, run) for run in runs):
            assert time.monotonic() < deadline, "the runs never reached the shared step"
            assert all(run.poll() is None for run in runs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.5)
        assert not (cache / shared.key / "result.json").exists()
    codes = [run.wait(timeout=600) for run in runs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [out[-2000:] for out in outputs]
    assert all("another experiment is computing this step" in out for out in outputs)
    assert sum(f"reusing {shared.key}" in out for out in outputs) == 1  # one computed it, the other reused it
    result = json.loads((cache / shared.key / "result.json").read_text())
    assert result["attempts"] == 1  # computed once, by one process


def _waiting(cache, run) -> bool:
    """Whether ``run`` is blocked on a step lock: its pid is in the waiters of some lock file."""
    locks = cache / "locks"
    return locks.is_dir() and any(_blocked_on(run.pid, path) for path in locks.glob("step-*.lock"))


def _blocked_on(pid: int, path) -> bool:
    """/proc/locks lists the processes waiting for a lock (lines with '->') by pid and inode."""
    inode = os.stat(path).st_ino
    with open("/proc/locks") as handle:
        return any("->" in line and line.split()[5] == str(pid) and line.split()[6].endswith(f":{inode}")
                   for line in handle)


def test_a_stage_whose_optimizer_is_missing_fails_clearly_after_the_steps_before_it(tmp_path, data_dir, monkeypatch):
    from apexdsp.experiments import stages

    # A user's stage kind whose optimizer package is not installed.
    target = "apexdsp_missing_plugin.optimizer:Distill"
    monkeypatch.setitem(stages.STAGE_KINDS, "distill", stages.StageKind(
        "distill", target, lambda p, s, c: stages.import_optimizer(target, "distill")(), "a plug-in optimizer"))
    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir, extra=(
        '\n[[optimizer.stages]]\nkind = "distill"\n'))
    runner = runner_for(spec_path, tmp_path / "cache")
    with pytest.raises(ApexError, match=r"stage kind 'distill' needs apexdsp_missing_plugin.optimizer:Distill, which "
                                        r"cannot be imported"):
        runner.run(track=False)
    done = {step.label: runner.is_done(step) for step in runner.steps if step.kind == "compile"}
    assert done == {"labeled": True, "labeled+distill": False}  # no stand-in result for the missing stage


def test_computed_without_tracking_then_logged_later(tmp_path, data_dir):
    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir, name="offline-rag", experiment="offline")
    cache = tmp_path / "cache"
    offline = runner_for(spec_path, cache).run(track=False)
    assert offline.parent_run_id is None and [s.status for s in offline.steps] == ["computed"] * 3
    assert mlflow.get_experiment_by_name("offline") is None

    logged = runner_for(spec_path, cache).run(log_only=True)
    assert [s.status for s in logged.steps] == ["cached"] * 3  # nothing recomputed, everything logged
    runs = evaluation_runs("offline")
    assert sorted(r.data.params["stage"] for r in runs) == ["labeled", "uncompiled"]
    assert all("em" in r.data.metrics for r in runs)


def test_decomposition_and_compile_time_reach_the_evaluation_rows(tmp_path, data_dir, capsys):
    """A planning program with the ``decomposition`` metric: each evaluation scores the plans it wrote, the
    compiled one also says what its compile cost, and both reach MLflow and ``apexdsp compare``."""
    from apexdsp.experiments.compare import comparison, find_runs

    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir, name="tiny-opera", experiment="tiny-plans")
    text = spec_path.read_text().replace('name = "rag"', 'name = "opera"').replace(
        "answer_tokens = 12", "answer_tokens = 12\nmax_steps = 2\nmax_rewrites = 0\nwrite_queries = false\nplan_tokens = 48")
    spec_path.write_text(text.replace('metrics = ["em", "f1", "hit"]', 'metrics = ["em", "f1", "decomposition"]'))
    cache = tmp_path / "cache"
    summary = runner_for(spec_path, cache).run()
    uncompiled, compiled_step, labeled = summary.steps
    assert uncompiled.metrics["decomposition_planned"] == 2  # both questions planned, both plans scored
    assert 0.0 <= uncompiled.metrics["decomposition"] <= 1.0
    assert {"decomposition_format", "decomposition_executability"} <= set(uncompiled.metrics)
    assert "compile_seconds" not in uncompiled.metrics  # nothing was compiled for it
    assert labeled.metrics["compile_seconds"] == compiled_step.metrics["compile_seconds"] > 0

    parent = mlflow.get_run(summary.parent_run_id)
    assert parent.data.metrics["decomposition/uncompiled"] == uncompiled.metrics["decomposition"]
    table = comparison(find_runs("tiny-plans", []), ["em", "decomposition", "compile_seconds"])
    rows = {row["stage"]: row["metrics"] for row in table["runs"]}
    assert rows["uncompiled"]["decomposition"] == uncompiled.metrics["decomposition"]
    assert rows["labeled"]["compile_seconds"] == labeled.metrics["compile_seconds"]

    from apexdsp.cli.app import main

    capsys.readouterr()
    assert main(["compare", "--experiment", "tiny-plans", "--metric",
                 "em,f1,hit,decomposition,compile_seconds,lm_busy_share", "--no-plots"]) == 0
    printed = capsys.readouterr().out  # a pipe: every header whole, not cut to 80 columns
    assert "decomposition" in printed and "compile_seconds" in printed and "lm_busy_share" in printed
    assert f"{labeled.metrics['compile_seconds']:.3f}" in printed
    assert f"{uncompiled.metrics['lm_busy_share']:.3f}" in printed  # where the evaluation's time went

    # Question by question against the uncompiled run: the same two questions, each difference bracketed.
    from apexdsp.experiments.compare import paired_rows

    (paired,) = paired_rows(find_runs("tiny-plans", []))
    assert (paired["program"], paired["stage"], paired["against"]) == ("opera", "labeled", "uncompiled")
    f1 = paired["paired"]["f1"]
    assert f1["n"] == 2 and f1["low"] <= f1["difference"] <= f1["high"]
    assert abs(f1["difference"] - (labeled.metrics["f1"] - uncompiled.metrics["f1"])) < 1e-9
    assert "against the uncompiled run" in printed


GRPO_STAGE = """after = ["labeled+grpo"]

[lm]
default = "{model}"

[[optimizer.stages]]
kind = "grpo"
[optimizer.stages.settings]
module = "reader.generate"
reward = "answer"
max_steps = 2
prompts_per_step = 2
num_generations = 2
max_completion_length = 12
save_steps = 1
keep_checkpoints = true
micro_batch_size = 1  # each step as four passes of one sequence, accumulated
beta = 0.0
learning_rate = 1e-3
"""


def test_a_grpo_stage_trains_its_module_and_the_next_evaluation_runs_the_trained_weights(tmp_path, data_dir,
                                                                                          tiny_model_dir):
    """The weight-level stage through ``apexdsp run``: TRL trains ``reader.generate`` of a tiny random Llama,
    the step keeps the weights and the reward curve, and the evaluation after it decodes with them."""
    from safetensors.torch import load_file

    from apexdsp.experiments.compare import find_runs, reward_histories
    from apexdsp.lm.registry import local_engine

    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir, name="tiny-grpo", experiment="tiny-grpo",
                                      extra=GRPO_STAGE.format(model=tiny_model_dir))
    cache = tmp_path / "cache"
    summary = runner_for(spec_path, cache).run()
    assert [(s.kind, s.label) for s in summary.steps] == [
        ("compile", "labeled"), ("compile", "labeled+grpo"), ("evaluate", "labeled+grpo")]
    trained = summary.steps[1]
    assert trained.metrics["steps"] == 2 and trained.metrics["prompts"] == 2
    assert trained.metrics["compile_seconds"] >= trained.metrics["seconds"] > 0
    assert trained.metrics["time/generation_s"] > 0 and trained.metrics["zero_std/logged_steps"] == 2

    # The compiled program binds reader.generate (and only it) to the weights the stage trained.
    program = cache / trained.key / "program"
    manifest = json.loads((program / "apexdsp-compiled.json").read_text())
    assert {name: b["weights"] for name, b in manifest["modules"].items() if b.get("weights")} == {
        "reader.generate": "weights/reader.generate"}
    weights = program / "weights" / "reader.generate"
    base = load_file(tiny_model_dir / "model.safetensors")
    assert load_file(weights / "model.safetensors").keys() == base.keys()

    # The evaluation after the stage decoded with those weights, once per question.
    engine = local_engine(str(weights.resolve()))
    assert sum(engine.stats().step_sizes.values()) > 0
    report = json.loads((cache / summary.steps[2].key / "report.json").read_text())
    assert report["n"] == 2

    # The stage's reward curve reached its MLflow run, where ``apexdsp compare`` finds it for the plot.
    curves = reward_histories(find_runs("tiny-grpo", []))
    mean_reward = [points for name, points in curves.items() if name.endswith(": reward")]
    assert len(mean_reward) == 1 and [step for step, _ in mean_reward[0]] == [1, 2]

    # Had the run been killed after its last checkpoint, `apexdsp run --check` says where a rerun resumes.
    runner = runner_for(spec_path, cache)
    step = next(s for s in runner.steps if s.key == trained.key)
    (cache / trained.key / "result.json").unlink()
    assert runner.state(step).startswith("in progress: checkpoint at step 2 of 2, ")
    assert runner.state(step).endswith("min of work in 1 attempt")



def test_an_sft_stage_with_tracking_off_trains_the_reader_on_annotated_calls(tmp_path, data_dir, tiny_model_dir,
                                                                            monkeypatch):
    """``track = false`` reaches the weight stage too (the tracking URI is a closed port), and the SFT stage
    rebuilds the reader's calls from the training questions' annotations over the spec's index."""
    spec_path = write_tiny_experiment(tmp_path / "spec", data_dir, name="tiny-sft", experiment="tiny-sft",
                                      extra=SFT_STAGE.format(model=tiny_model_dir))
    spec_path.write_text(spec_path.read_text().replace('experiment = "tiny-sft"', 'experiment = "tiny-sft"\ntrack = false'))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    cache = tmp_path / "cache"
    summary = runner_for(spec_path, cache).run()
    assert summary.parent_run_id is None
    assert [(s.kind, s.label, s.status) for s in summary.steps][-2:] == [
        ("compile", "labeled+sft", "computed"), ("evaluate", "labeled+sft", "computed")]
    trained = summary.steps[-2]
    assert trained.metrics["sft_examples"] >= 1
    manifest = json.loads((cache / trained.key / "program" / "apexdsp-compiled.json").read_text())
    assert {name: b["weights"] for name, b in manifest["modules"].items() if b.get("weights")} == {
        "reader.generate": "weights/reader.generate"}


VANILLA_SPEC = """
name = "tiny-vanilla"
experiment = "tiny-models"

[data]
train = {{ file = "questions.jsonl", offset = 2, limit = 2 }}
test = {{ file = "questions.jsonl", limit = 2 }}

[program]
name = "vanilla"
[program.options]
max_tokens = 6

[lm]
default = "{model}"

[[optimizer.stages]]
kind = "labeled"
settings = {{ k = 2 }}

[evaluation]
metrics = ["em", "f1"]
threads = 2
"""


def test_a_compile_step_logs_its_program_as_a_registered_mlflow_model(tmp_path, data_dir, tiny_model_dir):
    """As ``apexdsp compile`` does: the step's run holds the model, registered as apexdsp-<program>, and the
    model answers as the step's program does; a program over a BM25 index built in memory says why it has none."""
    import dspy
    import pandas as pd

    from apexdsp.experiments.step_logging import NOT_A_MODEL
    from apexdsp.lm.adapter import TolerantChatAdapter
    from apexdsp.lm.registry import get_lm
    from apexdsp.optimizers.compiled import load_compiled
    from apexdsp.optimizers.mlflow_model import load_compiled_model

    rag = write_tiny_experiment(tmp_path / "spec", data_dir, name="tiny-rag-model", experiment="tiny-models",
                                extra=f'\n[lm]\ndefault = "{tiny_model_dir}"\n')
    vanilla = rag.parent / "tiny-vanilla.toml"
    vanilla.write_text(VANILLA_SPEC.format(model=tiny_model_dir))
    cache = tmp_path / "cache"
    summary = runner_for(vanilla, cache).run()
    compiled = next(step for step in summary.steps if step.kind == "compile")
    run = mlflow.get_run(compiled.run_id)
    uri = run.data.tags["apexdsp.model_uri"]
    assert mlflow.get_logged_model(uri.removeprefix("models:/")).source_run_id == compiled.run_id
    client = mlflow.MlflowClient()
    assert [(str(v.version), v.source) for v in client.search_model_versions("name='apexdsp-vanilla'")] == [("1", uri)]

    model = load_compiled_model(uri)
    assert len(model.unwrap_python_model().compiled.program.generate_answer.demos) == 2  # the stage's demos
    asked = ["Who directed Jaws?", "Is Paris the capital of France?"]
    answered = model.predict(pd.DataFrame({"question": asked}))["answer"].tolist()
    program = load_compiled(cache / compiled.key / "program").program
    with dspy.context(lm=get_lm(str(tiny_model_dir), cache=False), adapter=TolerantChatAdapter()):
        assert answered == [str(program(question=q).answer or "") for q in asked]

    assert {s.status for s in runner_for(vanilla, cache).run().steps} == {"cached"}  # logged once
    assert len(client.search_model_versions("name='apexdsp-vanilla'")) == 1

    searched = runner_for(rag, cache).run()
    compiled = next(step for step in searched.steps if step.kind == "compile")
    run = mlflow.get_run(compiled.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["apexdsp.model"] == NOT_A_MODEL
    assert "apexdsp.model_uri" not in run.data.tags and not client.search_registered_models("name='apexdsp-rag'")
