"""The bootstrap's judgement without an LM: each module's demo gate on hand-made traces, gold
decompositions as planner demos, and how candidate demo sets are drawn and ranked."""

from __future__ import annotations

import dspy

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Passage
from apexdsp.optimizers.config import BootstrapConfig, DemoGates
from apexdsp.programs.registry import build_program


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
