"""A compile is one MLflow run with a child run per stage, whoever starts it, and the bootstrap's candidates
are in its run with their scores.

A plain DSPy program (search BM25, read the passages) is bootstrapped and then SFT-trained from Python,
inside one run the caller opened. The student runs on the tiny random-init Llama; the teacher on DSPy's
scripted ``DummyLM`` (right answers for three training questions, a wrong one for the fourth). Everything
else is real: BM25 over HotpotQA paragraphs, TRL's SFTTrainer, the test's own sqlite MLflow store read back
with ``MlflowClient``; ``mlflow.dspy.autolog`` runs in a fresh interpreter, where import order is real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import mlflow
import pytest
from dspy.utils import DummyLM

from apexdsp.errors import ApexError
from apexdsp.optimizers import BootstrapConfig, ModuleSFT, RewardBootstrap, SFTStageConfig
from apexdsp.tracking import tracked_run, tracking_disabled

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(num_candidates=2, max_demos=1, threads=2, progress=False)


class ReadAnswer(dspy.Signature):
    """Answer the question in a few words, from the passages."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()


class SearchRead(dspy.Module):
    """Search BM25 with the question, read the two best passages."""

    def __init__(self, retriever):
        super().__init__()
        self.retriever = retriever
        self.read = dspy.Predict(ReadAnswer)

    def forward(self, question: str):
        passages = [f"{hit.title}: {hit.text[:160]}" for hit in self.retriever.search(question, k=2)]
        return dspy.Prediction(answer=self.read(question=question, passages=passages).answer)


def found(example, prediction, trace=None):
    """The gold answer appears, whole, in the program's answer."""
    return example.answer.lower() in str(prediction.answer).lower()


@pytest.fixture(scope="module")
def setup(paragraphs_index, tiny_model_dir):
    """Train and validation examples, the retriever, and a teacher scripted to answer three of four right."""
    from apexdsp.lm.engine import EngineConfig
    from apexdsp.lm.registry import get_lm
    from apexdsp.runtime import configure_dspy

    records, retriever = paragraphs_index
    configure_dspy(get_lm(str(tiny_model_dir), max_tokens=8, engine_config=EngineConfig(dtype="float32")))
    examples = [dspy.Example(question=r.question, answer=r.answer).with_inputs("question") for r in records[:6]]
    teacher = SearchRead(retriever)
    replies = [example.answer for example in examples[:3]] + ["zq nothing"]
    teacher.read.lm = DummyLM({e.question: {"answer": reply} for e, reply in zip(examples, replies)})
    return dict(retriever=retriever, train=examples[:4], val=examples[4:], teacher=teacher)


def client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri)


def all_runs(uri: str, where: str = "") -> list:
    experiments = [e.experiment_id for e in client(uri).search_experiments()]
    return client(uri).search_runs(experiments, where, max_results=1000) if experiments else []


def test_bootstrap_then_a_weight_stage_are_children_of_the_callers_run(setup, tmp_path, isolated_mlflow):
    with tracked_run("my-compile", run_name="search-read") as parent:
        bootstrap = RewardBootstrap(BootstrapConfig(**FAST), metric=found)
        bootstrapped = bootstrap.compile(SearchRead(setup["retriever"]), trainset=setup["train"],
                                         valset=setup["val"], teacher=setup["teacher"])
        sft = ModuleSFT(tmp_path / "out", SFTStageConfig(source="traces", max_steps=1, batch_size=2, train_layers=None,
                                                         max_length=2048), modules=("read",), metric=found)
        sft.compile(bootstrapped, trainset=setup["train"], teacher=setup["teacher"])

    runs = all_runs(isolated_mlflow)
    assert len(runs) == 3 and not all_runs(isolated_mlflow, "attributes.status = 'RUNNING'")
    assert {run.info.status for run in runs} == {"FINISHED"}
    children = {run.info.run_name: run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.run_id}
    assert sorted(children) == ["bootstrap", "sft-read"]
    # in the parent's experiment, where the MLflow UI shows them under it
    assert {run.info.experiment_id for run in children.values()} == {parent.experiment_id}
    assert children["bootstrap"].data.tags["apexdsp.kind"] == "bootstrap"

    run, report = children["bootstrap"], bootstrap.report
    assert len(report.candidates) >= 2  # the program without demos, and at least one demo set
    for figure in ("metric", "em", "f1"):
        history = client(isolated_mlflow).get_metric_history(run.info.run_id, f"candidate/{figure}")
        assert sorted((m.step, m.value) for m in history) == sorted((c["index"] + 1, c[figure])
                                                                   for c in report.candidates)
    assert run.data.metrics["chosen_candidate"] == report.chosen
    assert run.data.metrics["chosen/metric"] == report.best()["metric"]
    assert run.data.tags["apexdsp.chosen_candidate"] == report.best()["label"]
    assert run.data.metrics["compile_seconds"] >= report.bootstrap_seconds + report.selection_seconds > 0
    assert run.data.metrics["traces_passed"] == 3 and run.data.metrics["traces_failed"] == 1
    params = run.data.params
    assert params["metric"] == "found" and params["config.num_candidates"] == "2"
    assert params["trainset_examples"] == "4" and params["teacher"] == "SearchRead"
    table = client(isolated_mlflow).load_table(run.info.experiment_id, "candidates.json", run_ids=[run.info.run_id])
    assert sorted(table["step"]) == sorted(c["index"] + 1 for c in report.candidates)
    assert list(table[table["chosen"]]["candidate"]) == [report.best()["label"]]
    artifacts = {a.path for a in client(isolated_mlflow).list_artifacts(run.info.run_id)}
    assert {"candidates.json", "demos.json", "bootstrap_report.json"} <= artifacts


def test_a_bootstrap_alone_is_a_top_level_run_and_a_failed_one_ends_failed(setup, isolated_mlflow):
    bootstrap = RewardBootstrap(BootstrapConfig(**{**FAST, "num_candidates": 1}), metric=found)
    bootstrap.compile(SearchRead(setup["retriever"]), trainset=setup["train"], valset=setup["val"][:1],
                      teacher=setup["teacher"])
    with pytest.raises(ApexError, match="no trace of 1 training questions passed"):
        bootstrap.compile(SearchRead(setup["retriever"]), trainset=setup["train"][3:], teacher=setup["teacher"])
    runs = all_runs(isolated_mlflow)
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED"]
    assert {client(isolated_mlflow).get_experiment(run.info.experiment_id).name for run in runs} == {"apexdsp-compile"}
    assert not any("mlflow.parentRunId" in run.data.tags for run in runs)


def test_with_tracking_disabled_a_compile_logs_nothing(setup, isolated_mlflow):
    with tracking_disabled():
        bootstrap = RewardBootstrap(BootstrapConfig(**{**FAST, "num_candidates": 1}), metric=found)
        program = bootstrap.compile(SearchRead(setup["retriever"]), trainset=setup["train"], valset=setup["val"][:1],
                                    teacher=setup["teacher"])
    assert bootstrap.report.candidates and program.read.demos
    assert not Path(isolated_mlflow.removeprefix("sqlite:///")).exists()  # no store was even opened


AUTOLOG_FIRST = textwrap.dedent("""
    import json, sys
    from apexdsp.paths import configure_environment
    configure_environment()
    import dspy, mlflow
    from dspy.utils import DummyLM
    from apexdsp.tracking import configure_tracking
    configure_tracking()
    mlflow.set_experiment("autolog")
    mlflow.dspy.autolog(log_compiles=True)  # before any apexdsp optimizer is defined
    from apexdsp.optimizers import BootstrapConfig, RewardBootstrap
    from apexdsp.runtime import configure_dspy

    class QA(dspy.Signature):
        "Answer the question."

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    class Answer(dspy.Module):
        def __init__(self):
            super().__init__()
            self.answer = dspy.Predict(QA)

        def forward(self, question):
            return dspy.Prediction(answer=self.answer(question=question).answer)

    pairs = [("What is one?", "one"), ("What is two?", "two"), ("What is three?", "three")]
    configure_dspy(DummyLM({q: {"answer": a} for q, a in pairs}))
    examples = [dspy.Example(question=q, answer=a).with_inputs("question") for q, a in pairs]
    compiled = RewardBootstrap(BootstrapConfig(num_candidates=1, max_demos=1, threads=1, progress=False),
                               metric=lambda e, p, t=None: e.answer == p.answer).compile(
        Answer(), trainset=examples[:2], valset=examples[2:])
    mlflow.flush_trace_async_logging()
    experiment = mlflow.get_experiment_by_name("autolog").experiment_id
    compile_traces = len(mlflow.search_traces(locations=[experiment], return_type="list"))
    compiled(question="What is three?")  # inference after the compile is traced
    mlflow.flush_trace_async_logging()
    client = mlflow.MlflowClient()
    runs = [{"name": r.info.run_name, "id": r.info.run_id, "parent": r.data.tags.get("mlflow.parentRunId"),
             "params": sorted(r.data.params), "artifacts": sorted(a.path for a in client.list_artifacts(r.info.run_id))}
            for r in client.search_runs([experiment])]
    print(json.dumps({"compile_traces": compile_traces, "runs": runs,
                      "traces": len(mlflow.search_traces(locations=[experiment], return_type="list"))}))
""")


def test_dspy_autolog_turned_on_before_the_optimizers_are_imported_covers_them(tmp_path):
    """``mlflow.dspy.autolog`` patches the teleprompters defined when it is called; apexdsp's optimizers are
    patched even when defined later: no trace of the compile's own module calls, the compile logged."""
    result = subprocess.run([sys.executable, "-c", AUTOLOG_FIRST], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["compile_traces"] == 0 and found["traces"] == 1
    runs = {run["name"]: run for run in found["runs"]}
    outer = next(run for name, run in runs.items() if name != "bootstrap")  # the run autolog opened
    assert runs["bootstrap"]["parent"] == outer["id"] and outer["parent"] is None
    assert {"best_model.json", "trainset.json", "valset.json"} <= set(outer["artifacts"])
    assert "lm_params" in outer["params"] and "candidates.json" in runs["bootstrap"]["artifacts"]


def test_every_optimizer_follows_dspy_autolog():
    from dspy.teleprompt import Teleprompter

    from apexdsp.optimizers import ChoiceCalibration, ModuleGRPO, ProgressiveSchedule
    from apexdsp.tracking.dspy_autolog import FollowsDSPyAutolog

    for optimizer in (RewardBootstrap, ChoiceCalibration, ModuleSFT, ModuleGRPO, ProgressiveSchedule):
        assert optimizer in Teleprompter.__subclasses__()  # what autolog patches: direct subclasses only
        assert optimizer.__mro__[1] is FollowsDSPyAutolog  # before Teleprompter: DSPy wraps compile first
