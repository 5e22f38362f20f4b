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
    assert again.report.passed == report.passed
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
        if example.id == questions[6].id:
            raise RuntimeError("metric bug")
        return float(prediction.answer.lower() in {a.lower() for a in example.answers})

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


def test_gold_decompositions_become_planner_demos_only_when_written_as_questions(data_dir):
    from apexdsp.optimizers.demos import labeled_plan_demos
    from apexdsp.programs.planner import parse_plan

    musique = read_questions(data_dir / "musique" / "train.jsonl", limit=30)
    demos, rejected = labeled_plan_demos(musique, ["planner.write_plan"], DemoGates(), max_steps=3)
    relations = sum(any(">>" in s.question for s in q.decomposition) for q in musique)
    assert demos and rejected >= relations >= 1
    for demo in demos:
        assert ">>" not in demo.example["plan"] and demo.example_id.startswith("gold:")
        assert not parse_plan(demo.example["plan"], demo.example["question"]).issues
        assert demo.rewards["gold_agreement"] == 1.0 and demo.score >= DemoGates().min_plan_reward
        assert "executability" not in demo.rewards, "the index being compiled for is not MuSiQue's corpus"


def test_module_gates_on_a_hand_made_trace():
    """Each module's own gate, on a run whose answer missed but whose search found the gold answer."""
    from apexdsp.data.records import Question
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus
    from apexdsp.optimizers.demos import extract_demos, judge_rollouts
    from apexdsp.optimizers.rollouts import Rollout
    from apexdsp.programs.planner import parse_plan
    from apexdsp.programs.trajectory import RetrievedPassage, SubGoalRecord, Trajectory

    jaws = "Jaws is a 1975 American thriller film directed by Steven Spielberg."
    born = "Steven Spielberg (born December 18, 1946) is an American film director."
    retriever = BM25Retriever(Corpus(passages=[Passage(id="p0", title="Jaws (film)", text=jaws),
                                               Passage(id="p1", title="Steven Spielberg", text=born),
                                               Passage(id="p2", title="Sharks", text="Sharks are fish.")]))
    question = Question(id="q1", question="When was the director of Jaws born?", answer="December 18, 1946",
                        type="bridge", supporting_titles=["Jaws (film)", "Steven Spielberg"])
    program = build_program("apex", retriever=retriever)
    plan = program.planner.write_plan, {"question": question.question}, dspy.Prediction(
        plan="Sure! 1) Who directed Jaws?\n2) When was #1 born?")
    trajectory = Trajectory(program="apex", question=question.question, answer="born in 1946")
    trajectory.plans.append(parse_plan(plan[2].plan, question.question).plan.to_record())
    trajectory.subgoals = [SubGoalRecord(step=1, question="Who directed Jaws?", answer="Steven Spielberg"),
                           SubGoalRecord(step=2, question="When was #1 born?", answer="1946")]
    trajectory.retrieved = [RetrievedPassage(pid="p0", title="Jaws (film)", text=jaws, query="Jaws director"),
                            RetrievedPassage(pid="p2", title="Sharks", text="Sharks are fish.", query="shark"),
                            RetrievedPassage(pid="p1", title="Steven Spielberg", text=born, query="Spielberg born")]
    shown = f"[1] Steven Spielberg: {born}"
    trace = [
        plan,
        (program.executor.write_query, {"question": "Who directed Jaws?"}, dspy.Prediction(query="Jaws director")),
        (program.executor.write_query, {"question": "What eats sharks?"}, dspy.Prediction(query="shark")),
        (program.executor.rewrite, {"question": "Who directed Jaws?", "failed_query": "Jaws director"},
         dspy.Prediction(query="Jaws director")),
        (program.executor.analyze, {"question": "Who directed Jaws?", "passages": f"[1] Jaws (film): {jaws}"},
         dspy.Prediction(answer="Steven Spielberg.", answered="Yes", analysis="The passage says so.")),
        (program.executor.analyze, {"question": "Who directed Jaws?", "passages": "[1] Sharks: Sharks are fish."},
         dspy.Prediction(answer="Steven Spielberg", answered="yes", analysis="A guess.")),
        (program.reflector.reflect, {"question": question.question, "findings": "- ..."},
         dspy.Prediction(enough="", follow_up="")),
        (program.answer_step.generate, {"question": question.question, "findings": "- ...", "passages": shown},
         dspy.Prediction(answer="The answer is: born in 1946")),
    ]
    rollout = Rollout(question=question, example=dspy.Example(question=question.question).with_inputs("question"),
                      prediction=dspy.Prediction(answer="born in 1946", trajectory=trajectory), trace=trace)
    [verdict] = judge_rollouts([rollout], DemoGates(), retriever)
    assert verdict.passed and verdict.reason == "hit" and verdict.f1 < 0.5
    assert verdict.plan.components["executability"] == 1.0 and verdict.plan.value >= 0.7
    names = {id(p): n for n, p in program.named_predictors()}
    demos, rejected = extract_demos(rollout, verdict, names, DemoGates())
    by_name = {demo.predictor: demo.example for demo in demos}
    assert by_name["planner.write_plan"]["plan"] == "1. Who directed Jaws?\n2. When was #1 born?"
    assert by_name["executor.write_query"]["query"] == "Jaws director"  # the query that found a gold title
    assert by_name["executor.analyze"]["passages"].startswith("[1] Jaws")  # the answer must be in its passages
    assert (by_name["executor.analyze"]["answer"], by_name["executor.analyze"]["answered"]) == ("Steven Spielberg", "yes")
    assert by_name["answer_step.generate"]["answer"] == "December 18, 1946"  # gold, and in the passages shown
    assert "executor.rewrite" not in by_name and "reflector.reflect" not in by_name
    assert rejected == {"executor.write_query": 1, "executor.rewrite": 1, "executor.analyze": 1,
                        "reflector.reflect": 1}
    strict = DemoGates(min_answer_f1=1.0, accept_hit=False, label_answers_from_evidence=False)
    [failed] = judge_rollouts([rollout], strict, retriever)
    assert not failed.passed and extract_demos(rollout, failed, names, strict) == ([], {})


def test_compile_and_evaluate_compiled_from_the_command_line(data_dir, tmp_path, isolated_mlflow):
    """The console scripts end to end on the closed-book program (no index needed): one MLflow run with
    the candidates table and the saved program as an artifact; ``evaluate --compiled`` runs it."""
    import mlflow

    apexdsp = str(__import__("pathlib").Path(sys.executable).parent / "apexdsp")
    out = tmp_path / "vanilla-compiled"
    train = data_dir / "hotpotqa" / "train.jsonl"
    result = subprocess.run([apexdsp, "compile", "--program", "vanilla", "--trainset", str(train), "--limit-train",
                             "3", "--out", str(out), "--min-answer-f1", "0", "--candidates", "1", "--max-demos", "1",
                             "--no-score-zero-shot", "--threads", "3", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["passed"] == {"f1": 3} and summary["demos"] == {"generate_answer": 1}
    assert (out / "apexdsp-compiled.json").is_file() and not list(tmp_path.glob(".vanilla-compiled*"))
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["program"] == "vanilla" and run.data.params["gates.min_answer_f1"] == "0.0"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"candidates.json", "demo_rewards.json", "bootstrap_report.json", "compiled"} <= artifacts
    evaluated = subprocess.run([apexdsp, "evaluate", "--compiled", str(out), "--questions",
                                str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "2", "--no-track", "--json"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["n"] == 2


def test_a_candidate_that_repeats_a_demo_answer_ranks_below_one_that_reads_its_input():
    from apexdsp.optimizers.candidates import CandidateScore, build_candidates
    from apexdsp.optimizers.demos import Demo

    config = BootstrapConfig()
    copier = CandidateScore(index=1, label="random #1", demos={}, metric=0.07, em=0.07, f1=0.07, hit=None,
                            decomposition=0.4, copy_rate=0.46)
    reader = CandidateScore(index=2, label="random #2", demos={}, metric=0.0, em=0.0, f1=0.05, hit=None,
                            decomposition=0.3)
    assert max([copier, reader], key=lambda s: s.key(config)) is reader
    pool = {"a": [Demo("a", "S", dspy.Example(x=str(i)), float(i), f"q{i}") for i in range(4)],
            "b": [Demo("b", "S", dspy.Example(x="b"), 1.0, "q9")]}
    sets = build_candidates(pool, {"a": 2, "b": 1}, count=8, seed=0)
    assert [d.example_id for d in sets[0]["a"]] == ["q3", "q2"] and len(sets[0]["b"]) == 1  # best first
    assert len({tuple(sorted((k, tuple(d.example_id for d in v)) for k, v in s.items())) for s in sets}) == len(sets)
    assert any("b" not in s for s in sets[1:]), "random candidates may leave a module without demos"


def test_the_first_candidate_shows_each_answer_before_repeating_one():
    """Two yes/no demos show a "yes" and a "no", even when the three best-ranked all say yes."""
    from apexdsp.optimizers.candidates import diverse_answers
    from apexdsp.optimizers.demos import Demo

    ranked = [Demo("d", "DecideFromFindings", dspy.Example(answer=a), 1.0, f"q{i}")
              for i, a in enumerate(["yes", "Yes", "yes", "no", "no"])]
    assert [d.example_id for d in diverse_answers(ranked, 2)] == ["q0", "q3"]
    assert [d.example_id for d in diverse_answers(ranked, 4)] == ["q0", "q3", "q1", "q4"]
    assert [d.example_id for d in diverse_answers(ranked[:1], 3)] == ["q0"]


def test_query_writing_demos_must_carry_queries_the_program_would_use():
    """QAgent's write_queries: an output that copies the adapter's ``{question}`` template (the program then
    searched with its fallbacks, so the run still found the answer) is never a demo; a real one is, cleaned."""
    from apexdsp.data.records import Question
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus
    from apexdsp.optimizers.demos import echoes_template, extract_demos, judge_rollouts
    from apexdsp.optimizers.rollouts import Rollout
    from apexdsp.programs.trajectory import RetrievedPassage, Trajectory

    jaws = "Jaws is a 1975 American thriller film directed by Steven Spielberg."
    retriever = BM25Retriever(Corpus(passages=[Passage(id="p0", title="Jaws (film)", text=jaws),
                                               Passage(id="p2", title="Sharks", text="Sharks are fish.")]))
    question = Question(id="q1", question="Who directed Jaws?", answer="Steven Spielberg",
                        supporting_titles=["Jaws (film)"])
    program = build_program("qagent", retriever=retriever)
    trajectory = Trajectory(program="qagent", question=question.question, answer="Steven Spielberg")
    trajectory.retrieved = [RetrievedPassage(pid="p0", title="Jaws (film)", text=jaws, query="Jaws film director")]
    inputs = {"question": question.question, "plan": "1. Who directed Jaws?"}
    copied = (program.write_queries, inputs, dspy.Prediction(queries="{question}"))
    written = (program.write_queries, inputs, dspy.Prediction(queries="Queries:\n1. Jaws film director\n2. ok"))
    assert echoes_template(program.write_queries, {"queries": "{question}"})
    assert not echoes_template(program.write_queries, {"queries": "Jaws film director"})
    names = {id(p): n for n, p in program.named_predictors()}
    for trace, expected in (([copied], None), ([copied, written], "Jaws film director")):
        rollout = Rollout(question=question, example=dspy.Example(question=question.question).with_inputs("question"),
                          prediction=dspy.Prediction(answer="Steven Spielberg", trajectory=trajectory), trace=trace)
        [verdict] = judge_rollouts([rollout], DemoGates(), retriever)
        demos, rejected = extract_demos(rollout, verdict, names, DemoGates())
        assert verdict.passed and rejected == {"write_queries": 1}  # the copied template, each time
        assert [d.example["queries"] for d in demos if d.predictor == "write_queries"] == (
            [expected] if expected else [])
