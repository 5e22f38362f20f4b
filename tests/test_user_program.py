"""A plain DSPy program of the user's own, compiled with nothing but ``apexdsp.optimizers``' public names.

``SearchRead`` is what a DSPy user writes: two predictors with their own signatures, a BM25 search in plain
Python between them, a ``dspy.Prediction`` out; no apexdsp ``Trajectory``. It is compiled the DSPy way
(settings in ``__init__``, ``compile(student, *, trainset, valset, teacher)``): bootstrapped demos chosen by
the user's own metric, SFT of the reader on the runs that metric accepts, GRPO of the query writer on the
user's own reward function, then saved and loaded in a fresh process.

The student runs on the tiny random-init Llama (its replies are junk, which the gates must never show as
demos); the teacher, which a user would give a stronger LM, runs on DSPy's scripted ``DummyLM``, whose
replies are set per question here: right answers, a wrong one, a verbose right one, and template echoes.
Everything else is real: DSPy's adapter and tracing, BM25 over real HotpotQA paragraphs, TRL's trainers,
an MLflow sqlite store, safetensors on disk.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import dspy
import pytest
from dspy.utils import DummyLM
from safetensors.torch import load_file

from apexdsp.errors import ApexError
from apexdsp.optimizers import (BootstrapConfig, ModuleGRPO, ModuleGRPOConfig, ModuleSFT, RewardBootstrap,
                                SFTStageConfig, save_compiled)

ROOT = Path(__file__).resolve().parents[1]


class WriteQuery(dspy.Signature):
    """Write a short search query that finds what the question asks about."""

    question: str = dspy.InputField()
    query: str = dspy.OutputField()


class ReadAnswer(dspy.Signature):
    """Answer the question in a few words, from the passages."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()


class SearchRead(dspy.Module):
    """The user's program: write a query, search BM25, read the passages."""

    def __init__(self, retriever, k: int = 2):
        super().__init__()
        self.retriever, self.k = retriever, k
        self.search = dspy.Predict(WriteQuery)
        self.read = dspy.Predict(ReadAnswer)

    def forward(self, question: str):
        query = self.search(question=question).query
        usable = len(re.findall(r"[^\W_]+", query or "")) >= 2
        hits = self.retriever.search(query if usable else question, k=self.k)
        passages = [f"{hit.title}: {hit.text[:160]}" for hit in hits]
        answer = self.read(question=question, passages=passages).answer
        return dspy.Prediction(query=query, titles=[hit.title for hit in hits], answer=answer)


def answer_found(example, prediction, trace=None):
    """The user's metric: the gold answer appears, whole, in the program's answer."""
    return example.answer.lower() in str(prediction.answer).lower()


def bm25(corpus_file):
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import load_corpus

    return BM25Retriever(load_corpus(corpus_file))


def tiny_lm(model_dir):
    from apexdsp.lm.engine import EngineConfig
    from apexdsp.lm.registry import get_lm

    return get_lm(str(model_dir), max_tokens=8, engine_config=EngineConfig(dtype="float32"))


# What the teacher's LM writes for each training question (query, answer), and what the metric says.
TEACHER = [
    ("Newark UK Parliament constituency by-election", "Robert Jenrick"),  # right: both calls are demos
    ("[#]\n[#]", "Casement's Fort"),  # right, but the query is junk: only the reader's call is a demo
    ("Jimmy Fallon born", "Brooklyn"),  # F1 0.5 with "Bay Ridge, Brooklyn", but the metric says no
    ("{question}", "Bill Murray"),  # right; the query echoes the template
    ("Hawaiian hibiscus species flowers",  # the metric says yes, though F1 is far below 0.5
     "About 250 of the species that grow in Hawaii have flowers of other colours, the passage says"),
    ("Sergio Casal Manuel Orantes sport", "golf"),  # wrong
]
PASSING = [0, 1, 3, 4]


@pytest.fixture(scope="module")
def questions(data_dir):
    from apexdsp.data.loaders import read_questions

    return read_questions(data_dir / "hotpotqa" / "train.jsonl", limit=8)


@pytest.fixture(scope="module")
def setup(questions, tiny_model_dir, tmp_path_factory):
    """The user's data as plain ``dspy.Example``s, the corpus file, the LM, the retriever and the teacher."""
    from apexdsp.experiments.quickstart import paragraph_corpus
    from apexdsp.runtime import configure_dspy

    folder = tmp_path_factory.mktemp("user-program")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in paragraph_corpus(questions)))
    configure_dspy(tiny_lm(tiny_model_dir))
    retriever = bm25(corpus)
    examples = [dspy.Example(question=q.question, answer=q.answer).with_inputs("question") for q in questions]
    teacher = SearchRead(retriever)
    teacher.search.lm = DummyLM({q.question: {"query": query} for q, (query, _) in zip(questions, TEACHER)})
    teacher.read.lm = DummyLM({q.question: {"answer": answer} for q, (_, answer) in zip(questions, TEACHER)})
    return dict(folder=folder, corpus=corpus, retriever=retriever, train=examples[:6], val=examples[6:],
                teacher=teacher)


FAST = dict(num_candidates=2, max_demos=2, threads=2, progress=False)


@pytest.fixture(scope="module")
def compiled(setup, questions, tiny_model_dir):
    """Bootstrap (the user's metric), SFT of the reader, GRPO of the query writer, in a private MLflow store."""
    import mlflow

    folder, train = setup["folder"], setup["train"]
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    calls: list[tuple] = []

    def query_reward(question, outputs, completion):
        """The user's reward for the query writer: the query's words found in the question, per word written."""
        calls.append((question, outputs, completion))
        words = re.findall(r"[^\W_]+", str(outputs.get("query") or "").lower())
        asked = set(re.findall(r"[^\W_]+", question.question.lower()))
        return (sum(word in asked for word in words) + 1) / (len(words) + 1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        bootstrap = RewardBootstrap(BootstrapConfig(**FAST), metric=answer_found)
        bootstrapped = bootstrap.compile(SearchRead(setup["retriever"]), trainset=train, valset=setup["val"],
                                         teacher=setup["teacher"])
        sft = ModuleSFT(folder / "out", SFTStageConfig(source="traces", max_steps=3, batch_size=2, train_layers=None,
                                                       learning_rate=1e-2, max_length=2048),
                        modules=("read",), metric=answer_found)
        read_trained = sft.compile(bootstrapped, trainset=train, teacher=setup["teacher"])
        grpo = ModuleGRPO(folder / "out", ModuleGRPOConfig(max_steps=2, prompts_per_step=2, num_generations=2,
                                                           max_completion_length=8, beta=0.0, learning_rate=1e-2),
                          module="search", reward=query_reward)
        trained = grpo.compile(read_trained, trainset=train)
        runs = mlflow.search_runs(experiment_names=["apexdsp-compile"])
    return dict(bootstrap=bootstrap, bootstrapped=bootstrapped, sft=sft, read_trained=read_trained, grpo=grpo,
                trained=trained, runs=runs, reward_calls=calls, tiny=tiny_model_dir)


def test_the_users_metric_decides_which_runs_become_demos(compiled, setup, questions):
    report, program = compiled["bootstrap"].report, compiled["bootstrapped"]
    assert report.trace_gate == "metric answer_found true"
    assert report.passed == {"metric": len(PASSING)} and report.failed == 2
    assert report.gates_not_applied == {}  # the metric replaced the answer gates; no apexdsp module inside
    assert report.rejected_reasons == {"search: junk output (no words)": 1, "search: junk output (template echo)": 1}
    gold = {q.question: setup["train"][i] for i, q in enumerate(questions[:6])}
    passing = {questions[i].question for i in PASSING}
    reads, searches = program.read.demos, program.search.demos
    assert reads and searches
    for demo in reads:
        assert demo["question"] in passing and answer_found(gold[demo["question"]], dspy.Prediction(answer=demo["answer"]))
        assert demo["passages"], "a reader demo shows the passages the teacher read"
    assert {d["query"] for d in searches} <= {TEACHER[0][0], TEACHER[4][0]}  # never "[#]" or "{question}"
    assert {d.predictor: d.pool for d in report.demos} == {"search": 2, "read": 4}


def test_a_scoring_metric_keeps_the_runs_at_its_threshold(setup):
    """DSPy's rule with ``metric_threshold``: the metric sees the run's trace and may return a
    ``dspy.Prediction`` with a score (as feedback metrics do); runs scoring at least the threshold pass."""
    from apexdsp.metrics import f1

    traces = []

    def answer_f1(example, prediction, trace=None):
        if trace is not None:  # None when scoring candidates on the valset, as in DSPy's Evaluate
            traces.append([predictor.signature.__name__ for predictor, _, _ in trace])
        return dspy.Prediction(score=f1(prediction.answer, [example.answer]), feedback="token F1")

    teleprompter = RewardBootstrap(BootstrapConfig(**{**FAST, "num_candidates": 1, "score_zero_shot": False}),
                                   metric=answer_f1, metric_threshold=0.5)
    teleprompter.compile(SearchRead(setup["retriever"]), trainset=setup["train"], valset=setup["val"][:1],
                         teacher=setup["teacher"])
    report = teleprompter.report
    assert report.trace_gate == "metric answer_f1 >= 0.5"
    assert report.passed == {"metric": 4}  # the right answers and "Brooklyn" (F1 0.5); not the verbose one
    assert {d.predictor: d.pool for d in report.demos} == {"search": 2, "read": 4}  # two of the queries are junk
    assert ["WriteQuery", "ReadAnswer"] in traces


def test_default_gates_apply_only_what_a_plain_program_records(setup):
    """Without a metric, apexdsp's answer gate judges the runs; the "gold answer retrieved" gate, which reads
    an apexdsp trajectory, is reported as not applied instead of failing every run."""
    teleprompter = RewardBootstrap(BootstrapConfig(**{**FAST, "num_candidates": 1, "score_zero_shot": False}))
    program = teleprompter.compile(SearchRead(setup["retriever"]), trainset=setup["train"], valset=setup["val"][:1],
                                   teacher=setup["teacher"])
    report = teleprompter.report
    assert report.passed == {"f1": 4}  # Jenrick, Casement's Fort, Brooklyn (F1 0.5), Bill Murray
    assert report.trace_gate == "answer F1 >= 0.5 or gold answer retrieved"
    assert "no retrieved passages" in report.gates_not_applied["gold answer retrieved"]
    assert program.read.demos


def test_when_nothing_passes_the_error_names_the_python_settings(setup, questions):
    wrong = [dspy.Example(question=q.question, answer="zq unanswerable").with_inputs("question")
             for q in questions[:2]]
    with pytest.raises(ApexError) as raised:
        RewardBootstrap(BootstrapConfig(**FAST)).compile(SearchRead(setup["retriever"]), trainset=wrong,
                                                         teacher=setup["teacher"])
    message = str(raised.value)
    assert "2x answer F1 < 0.5 (retrieval not recorded by the program)" in message
    assert "DemoGates(min_answer_f1=..., accept_hit=...)" in message and "RewardBootstrap(metric=...)" in message
    assert "--" not in message
    with pytest.raises(ApexError, match=r"relax the gates \(--min-answer-f1, --accept-hit\)$"):
        RewardBootstrap(BootstrapConfig(**FAST), hints="cli").compile(SearchRead(setup["retriever"]), trainset=wrong,
                                                                      teacher=setup["teacher"])


def test_the_students_own_junk_never_becomes_a_demo(setup):
    """The tiny student writes "]]]]..." for every field: a metric that accepts every run still gets no demo."""
    with pytest.raises(ApexError, match=r"no module call passed its own gate \(rejected: 2x search: junk output "
                                        r"\(no words\); 2x read: junk output \(no words\)\)"):
        RewardBootstrap(BootstrapConfig(**FAST), metric=lambda example, prediction, trace=None: True).compile(
            SearchRead(setup["retriever"]), trainset=setup["train"][:2])


def test_sft_trains_the_reader_on_the_runs_the_metric_accepts(compiled):
    sft, program, before = compiled["sft"], compiled["read_trained"], compiled["bootstrapped"]
    replies = [e.completion.split("[[ ## answer ## ]]")[1].split("[[ ## completed ## ]]")[0].strip()
               for e in sft.examples]
    assert sorted(replies) == sorted(TEACHER[i][1] for i in PASSING)  # the accepted runs' reader calls, only
    for example in sft.examples:
        assert example.module == "read" and example.completion.startswith("[[ ## answer ## ]]")
        assert example.messages[-1] == {"role": "assistant", "content": "[[ ## answer ## ]]"}  # the student's prefill
    weights = compiled["sft"].out_dir / "weights" / "read"
    assert program.read.lm.engine.model_dir == weights.resolve()
    assert program.search.lm is before.search.lm is None  # the other module keeps the configured LM
    assert program.read.demos == before.read.demos
    assert _changed(compiled["tiny"], weights)
    run = compiled["runs"].set_index("tags.mlflow.runName").loc["sft-read"]
    assert run["params.reward"] == "metric:answer_found" and run["metrics.sft_examples"] == len(PASSING)


def test_grpo_trains_the_query_writer_on_the_users_reward_function(compiled):
    grpo, program = compiled["grpo"], compiled["trained"]
    question, outputs, completion = compiled["reward_calls"][0]
    assert question.question and question.answer  # a Question record: the user's example, with its labels
    assert set(outputs) == {"query"} and isinstance(completion, str) and completion.startswith("[[ ## query ## ]]")
    assert len(compiled["reward_calls"]) == 2 * 2 * 2  # steps x prompts x generations
    weights = grpo.out_dir / "weights" / "search"
    assert grpo.result.steps == 2 and program.search.lm.engine.model_dir == weights.resolve()
    assert program.read.lm is compiled["read_trained"].read.lm  # the SFT-trained reader is kept
    assert _changed(compiled["tiny"], weights)
    run = compiled["runs"].set_index("tags.mlflow.runName").loc["grpo-search"]
    assert run["params.reward"] == "query_reward" and run["params.module"] == "search"


def test_saved_program_answers_the_same_in_a_fresh_process(compiled, setup, tmp_path):
    program = compiled["trained"]
    manifest = save_compiled(program, tmp_path / "compiled", lm=str(compiled["tiny"]))
    assert manifest.program.startswith("custom:") and manifest.program.endswith("test_user_program.SearchRead")
    assert {n: b.weights for n, b in manifest.modules.items()} == {"search": "weights/search", "read": "weights/read"}
    asked = [example.question for example in setup["val"]]
    here = [[p.query, p.answer] for p in map(lambda q: program(question=q), asked)]
    untrained = compiled["bootstrapped"]
    base = [[p.query, p.answer] for p in map(lambda q: untrained(question=q), asked)]
    # each trained module writes otherwise than the base model did: the comparison below sees its weights
    assert all(mine != theirs for a, b in zip(here, base) for mine, theirs in zip(a, b))
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from apexdsp.paths import configure_environment
        configure_environment()
        from apexdsp.optimizers import load_compiled
        from apexdsp.runtime import configure_dspy
        from test_user_program import SearchRead, bm25, tiny_lm
        configure_dspy(tiny_lm({str(compiled["tiny"])!r}))
        loaded = load_compiled({str(tmp_path / "compiled")!r}, program=SearchRead(bm25({str(setup["corpus"])!r})))
        program = loaded.program
        print(json.dumps({{"answers": [[p.query, p.answer] for p in map(lambda q: program(question=q), {asked!r})],
                          "demos": [len(program.search.demos), len(program.read.demos)]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["demos"] == [len(program.search.demos), len(program.read.demos)]
    assert loaded["answers"] == here


def _changed(base_dir: Path, weights: Path) -> bool:
    import torch

    before, after = load_file(base_dir / "model.safetensors"), load_file(weights / "model.safetensors")
    return any(not torch.equal(before[k], after[k]) for k in before)
