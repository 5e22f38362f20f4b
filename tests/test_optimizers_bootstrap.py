"""Reward-gated bootstrapping for real: SmolLM2-135M (float32, so answers do not depend on batching), BM25
over the real paragraphs of a handful of HotpotQA training questions, programs with cut-down budgets.

One apex compile is shared by the tests that inspect it; it is saved, and a fresh Python process loads
it and must answer exactly as the compiled program did here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dspy
import pytest

from apexdsp.data.examples import to_examples
from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Passage
from apexdsp.errors import ApexError
from apexdsp.experiments.quickstart import paragraph_corpus
from apexdsp.optimizers.bootstrap import RewardBootstrap
from apexdsp.optimizers.compiled import load_compiled, save_compiled
from apexdsp.optimizers.config import BootstrapConfig, DemoGates
from apexdsp.programs.registry import build_program

pytestmark = pytest.mark.slow

SMALL_APEX = {"max_steps": 2, "max_rewrites": 0, "max_reflections": 0, "write_queries": False,
              "analysis_tokens": 32, "plan_tokens": 48, "answer_tokens": 12, "k": 3}
FAST = dict(num_candidates=2, threads=4, progress=False, max_demos=1, max_demos_by_signature={"WritePlan": 2})


@pytest.fixture(scope="module")
def questions(data_dir):
    return read_questions(data_dir / "hotpotqa" / "train.jsonl", limit=8)


@pytest.fixture(scope="module")
def corpus_file(questions, tmp_path_factory):
    """The gold and distractor paragraphs of the questions, as a corpus file a fresh process can read."""
    rows = paragraph_corpus(questions)
    path = tmp_path_factory.mktemp("bootstrap") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def bm25(corpus_file):
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    return BM25Retriever(Corpus(passages=[Passage(**row) for row in rows]))


@pytest.fixture(scope="module")
def retriever(corpus_file):
    return bm25(corpus_file)


@pytest.fixture(scope="module")
def lm():
    from apexdsp.lm.engine import EngineConfig
    from apexdsp.lm.registry import get_lm
    from apexdsp.runtime import configure_dspy

    return configure_dspy(get_lm("smollm2-135m", engine_config=EngineConfig(dtype="float32")))


APEX_CONFIG = BootstrapConfig(gates=DemoGates(min_plan_reward=0.5), **FAST)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoint") / "apex.checkpoint.json"


@pytest.fixture(scope="module")
def compiled_apex(lm, retriever, questions, checkpoint):
    teleprompter = RewardBootstrap(APEX_CONFIG, checkpoint=checkpoint)
    student = build_program("apex", retriever=retriever, **SMALL_APEX)
    program = teleprompter.compile(student, trainset=questions[:6], valset=questions[6:8])
    return program, teleprompter.report, student


def test_compiled_apex_carries_only_demos_that_passed_their_gates(compiled_apex, questions):
    program, report, student = compiled_apex
    assert program._compiled and program is not student
    assert not any(p.demos for _, p in student.named_predictors()), "the student itself must stay untouched"
    assert report.train_examples == 6 and report.val_examples == 2
    assert sum(report.passed.values()) + report.failed == 6 and sum(report.passed.values()) >= 1
    assert set(report.passed) <= {"f1", "hit"}
    assert {c["label"] for c in report.candidates} >= {"zero-shot", "top-ranked"}
    assert report.chosen >= 0, "the zero-shot program competes only with allow_zero_shot"
    by_name = {d.predictor: d for d in report.demos}
    attached = {name: p.demos for name, p in program.named_predictors()}
    assert sum(map(len, attached.values())) >= 1
    for name, demos in attached.items():
        assert len(demos) == by_name[name].chosen <= (2 if name == "planner.write_plan" else 1)
    gold = {q.question: q for q in questions}
    for demo in attached["planner.write_plan"]:
        from apexdsp.programs.planner import parse_plan

        parsed = parse_plan(demo["plan"], demo["question"])
        assert not parsed.fallback and not parsed.issues, "a planner demo is shown parsed and renumbered"
        assert by_name["planner.write_plan"].component_means["decomposition"] >= 0.5
    for demo in attached["answer_step.generate"]:
        from apexdsp.metrics import f1

        assert f1(demo["answer"], gold[demo["question"]].answers) >= 0.5


def test_compiled_program_saved_and_loaded_in_a_fresh_process_answers_the_same(compiled_apex, questions,
                                                                               corpus_file, tmp_path):
    program, report, _ = compiled_apex
    out = tmp_path / "apex-compiled"
    save_compiled(program, out, lm="smollm2-135m", optimizer={"name": "bootstrap", "report": report.model_dump()})
    asked = [q.question for q in questions[6:8]]
    here = [program(question=q).answer for q in asked]
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from apexdsp.paths import configure_environment
        configure_environment()
        from apexdsp.lm.engine import EngineConfig
        from apexdsp.lm.registry import get_lm
        from apexdsp.optimizers.compiled import load_compiled
        from apexdsp.runtime import configure_dspy
        from test_optimizers_bootstrap import bm25
        import pathlib
        configure_dspy(get_lm("smollm2-135m", engine_config=EngineConfig(dtype="float32")))
        program = load_compiled({str(out)!r}, retriever=bm25(pathlib.Path({str(corpus_file)!r}))).program
        print(json.dumps([program(question=q).answer for q in {asked!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here


def test_an_interrupted_compile_resumes_from_its_checkpoint(compiled_apex, retriever, questions, checkpoint):
    program, report, student = compiled_apex
    assert checkpoint.is_file()
    # No LM at all: every phase must come from the checkpoint, or the compile would find no passing trace.
    with dspy.context(lm=None):
        again = RewardBootstrap(APEX_CONFIG, checkpoint=checkpoint)
        resumed = again.compile(student, trainset=questions[:6], valset=questions[6:8])
        assert [p.demos for _, p in resumed.named_predictors()] == [p.demos for _, p in program.named_predictors()]
        assert again.report.candidates == report.candidates and again.report.passed == report.passed
        assert again.report.rejected_reasons == report.rejected_reasons  # kept with the pooled demos
        changed = APEX_CONFIG.model_copy(update={"seed": 1})  # other settings: the checkpoint is not theirs
        with pytest.raises(ApexError, match="no trace of 6 training questions passed"):
            RewardBootstrap(changed, checkpoint=checkpoint).compile(student, trainset=questions[:6],
                                                                    valset=questions[6:8])


def test_a_compile_killed_in_its_teacher_pass_resumes_with_the_questions_not_yet_judged(
        compiled_apex, lm, retriever, questions, corpus_file, data_dir, tmp_path):
    program, report, student = compiled_apex
    checkpoint = tmp_path / "bootstrap.checkpoint.json"  # where an `apexdsp run` bootstrap stage keeps it
    # The same compile in another process, one question at a time (threads are not part of the checkpoint's
    # fingerprint), killed once two questions were judged.
    script = textwrap.dedent(f"""
        import pathlib, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from apexdsp.paths import configure_environment
        configure_environment()
        from apexdsp.data.loaders import read_questions
        from apexdsp.lm.engine import EngineConfig
        from apexdsp.lm.registry import get_lm
        from apexdsp.optimizers.bootstrap import RewardBootstrap
        from apexdsp.programs.registry import build_program
        from apexdsp.runtime import configure_dspy
        from test_optimizers_bootstrap import APEX_CONFIG, SMALL_APEX, bm25
        configure_dspy(get_lm("smollm2-135m", engine_config=EngineConfig(dtype="float32")))
        questions = read_questions(pathlib.Path({str(data_dir / "hotpotqa" / "train.jsonl")!r}), limit=8)
        student = build_program("apex", retriever=bm25(pathlib.Path({str(corpus_file)!r})), **SMALL_APEX)
        RewardBootstrap(APEX_CONFIG.model_copy(update={{"threads": 1}}), checkpoint={str(checkpoint)!r}).compile(
            student, trainset=questions[:6], valset=questions[6:8])
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    judged = _judged_questions(checkpoint)
    deadline = time.time() + 400
    while judged < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        judged = _judged_questions(checkpoint)
    process.kill()
    _, stderr = process.communicate()
    assert 2 <= judged < 6, stderr.decode()[-3000:]
    saved = json.loads(checkpoint.read_text())
    assert saved["bootstrap"] is None and not saved["candidates"]
    from apexdsp.experiments.stages import STAGE_KINDS  # what `apexdsp run --check` shows for the step

    described = STAGE_KINDS["bootstrap"].progress(tmp_path)
    assert described == f"teacher pass: {len(saved['teacher'])} training questions judged"

    again = RewardBootstrap(APEX_CONFIG, checkpoint=checkpoint)
    resumed = again.compile(student, trainset=questions[:6], valset=questions[6:8])
    assert again.report.teacher_resumed == len(saved["teacher"])
    # Pooled in trainset order: the same demos and candidates as the compile that was never interrupted.
    assert [p.demos for _, p in resumed.named_predictors()] == [p.demos for _, p in program.named_predictors()]
    assert again.report.passed == report.passed and again.report.rejected_reasons == report.rejected_reasons
    assert [(c["label"], c["metric"], c["f1"]) for c in again.report.candidates] == \
        [(c["label"], c["metric"], c["f1"]) for c in report.candidates]
    assert json.loads(checkpoint.read_text())["teacher"] == {}  # the finished pass replaced the per-question part


def _judged_questions(checkpoint: Path) -> int:
    try:
        return len(json.loads(checkpoint.read_text()).get("teacher") or {})
    except (OSError, ValueError):
        return 0


class PlanSearchAnswer(dspy.Module):
    """A user's own program built from apexdsp modules: plan, execute, answer (no reflection)."""

    def __init__(self, retriever):
        super().__init__()
        from apexdsp.programs.answer import AnswerStep
        from apexdsp.programs.executor import Executor
        from apexdsp.programs.planner import Planner

        self.plan = Planner(max_steps=2, max_tokens=48)
        self.search = Executor(retriever, k=3, max_rewrites=0, write_queries=False, answer_tokens=32)
        self.read = AnswerStep(max_tokens=12)

    def forward(self, question):
        from apexdsp.programs.evidence import evidence_pool
        from apexdsp.programs.executor import findings_text
        from apexdsp.programs.trajectory import Trajectory

        trajectory = Trajectory(program="plan-search-answer", question=question)
        planned = self.plan(question=question)
        trajectory.plans.append(planned.record)
        self.search(steps=planned.plan.steps, trajectory=trajectory)
        answer = self.read(question=question, findings=findings_text(trajectory.subgoals),
                           passages=evidence_pool(trajectory, 3), records=trajectory.subgoals).answer
        trajectory.answer = answer
        return dspy.Prediction(answer=answer, trajectory=trajectory)


def test_a_users_own_program_from_our_modules_compiles_and_round_trips(lm, retriever, questions, tmp_path):
    def raising_metric(example, prediction, trace=None):
        """The user's own rule (it decides which runs become demos): the gold answer was found."""
        from apexdsp.metrics.answer import answer_hit

        if example.id == questions[6].id:
            raise RuntimeError("metric bug")
        found = [f"{p.title} {p.text}" for p in prediction.trajectory.retrieved]
        return answer_hit(list(example.answers), [prediction.answer, *found])

    teleprompter = RewardBootstrap(BootstrapConfig(gates=DemoGates(min_plan_reward=0.5), score_zero_shot=False,
                                                   **{**FAST, "num_candidates": 1}), metric=raising_metric)
    student = PlanSearchAnswer(retriever)
    program = teleprompter.compile(student, trainset=questions[:6], valset=questions[6:8])
    report = teleprompter.report
    with_demos = {d.predictor for d in report.demos}
    assert with_demos >= {"plan.write_plan", "search.write_query", "search.analyze", "search.rewrite",
                          "read.generate"}
    assert with_demos <= {name for name, _ in student.named_predictors()}  # read.decide if a yes/no passed
    best = report.best()
    assert best["metric_failures"] == 1 and "metric bug" in best["failure_examples"][0]
    manifest = save_compiled(program, tmp_path / "custom", lm="smollm2-135m")
    assert manifest.program.endswith("PlanSearchAnswer")
    loaded = load_compiled(tmp_path / "custom", program=PlanSearchAnswer(retriever)).program
    assert [p.demos for _, p in loaded.named_predictors()] == [
        [dict(d) for d in p.demos] for _, p in program.named_predictors()]


def test_no_trace_passing_is_a_clear_error(lm, questions):
    nonsense = [q.model_copy(update={"answer": f"zq{i}xv unanswerable", "answer_aliases": []})
                for i, q in enumerate(questions[:2])]
    teleprompter = RewardBootstrap(BootstrapConfig(gates=DemoGates(min_answer_f1=1.0, accept_hit=False), **FAST))
    with pytest.raises(ApexError, match=r"no trace of 2 training questions passed the gates \(2x answer F1 < 1.0\)"):
        teleprompter.compile(build_program("vanilla", max_tokens=8), trainset=to_examples(nonsense))


def test_teacher_with_other_modules_is_refused(lm, retriever, questions):
    with pytest.raises(ApexError, match="the teacher's predictors"):
        RewardBootstrap(BootstrapConfig(**FAST)).compile(
            build_program("apex", retriever=retriever, **SMALL_APEX), trainset=questions[:1],
            teacher=build_program("opera", retriever=retriever))


def test_compile_and_evaluate_compiled_from_the_command_line(data_dir, tmp_path, isolated_mlflow):
    """The console scripts end to end on the closed-book program (no index needed): one MLflow run with the
    saved program as an artifact and a child run per stage (the bootstrap's, with the candidates table, then
    the schedule's); ``evaluate --compiled`` runs it."""
    import mlflow

    apexdsp = str(__import__("pathlib").Path(sys.executable).parent / "apexdsp")
    out = tmp_path / "vanilla-compiled"
    train = data_dir / "hotpotqa" / "train.jsonl"
    result = subprocess.run([apexdsp, "compile", "--program", "vanilla", "--trainset", str(train), "--limit-train",
                             "3", "--out", str(out), "--min-answer-f1", "0", "--candidates", "1", "--max-demos", "1",
                             "--no-score-zero-shot", "--threads", "3", "--optimizer", "bootstrap+calibrate", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["passed"] == {"f1": 3} and summary["demos"] == {"generate_answer": 1}
    assert (out / "apexdsp-compiled.json").is_file() and not list(tmp_path.glob(".vanilla-compiled*"))
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["program"] == "vanilla" and run.data.params["gates.min_answer_f1"] == "0.0"
    client = mlflow.MlflowClient()
    assert "compiled" in {a.path for a in client.list_artifacts(run.info.run_id)}
    children = {child.info.run_name: child for child in client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")}
    assert sorted(children) == ["bootstrap", "schedule"] and children["bootstrap"].data.metrics["chosen_candidate"] == 0
    assert {"candidates.json", "demos.json", "bootstrap_report.json"} <= {
        a.path for a in client.list_artifacts(children["bootstrap"].info.run_id)}
    assert not client.search_runs([run.info.experiment_id], "attributes.status != 'FINISHED'")
    evaluated = subprocess.run([apexdsp, "evaluate", "--compiled", str(out), "--questions",
                                str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "2", "--no-track", "--json"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["n"] == 2
