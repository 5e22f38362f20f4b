"""Experiment specs: the checked-in specs load, and every kind of mistake is one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from apexdsp.errors import ApexError
from apexdsp.experiments.spec import QuestionSource, load_spec
from apexdsp.experiments.sources import load_source, source_identity
from apexdsp.experiments.steps import plan_steps
from apexdsp.paths import repo_root
from experiment_fixtures import write_tiny_experiment

SPECS = sorted((repo_root() / "experiments" / "specs").glob("*.toml"))


def test_every_dataset_program_pair_has_a_spec():
    names = {path.stem for path in SPECS}
    assert names == {f"{d}-{p}" for d in ("hotpotqa", "2wikimultihopqa", "musique")
                     for p in ("rag", "apex", "opera", "qagent")}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_checked_in_specs_load_and_plan_an_evaluation_after_every_stage(path, data_dir):
    spec = load_spec(path)
    stages = [stage.label for stage in spec.optimizer.stages]
    assert spec.optimizer.stages[0].kind == "bootstrap" and spec.optimizer.stages[-1].kind == "grpo"
    # uncompiled, then one cumulative label per stage: bootstrap, bootstrap+sft, bootstrap+sft+grpo
    assert spec.checkpoints() == ["uncompiled"] + ["+".join(stages[:n]) for n in range(1, len(stages) + 1)]
    assert spec.data.test.file.is_relative_to(data_dir)  # found in the shared data folder
    kinds = [step.kind for step in plan_steps(spec)]
    assert kinds == ["encoder", "index", "evaluate"] + ["compile", "evaluate"] * len(stages)


def test_specs_of_one_dataset_share_the_encoder_and_index_steps():
    plans = [plan_steps(load_spec(path)) for path in SPECS if path.stem.startswith("musique-")]
    assert len({plan[1].key for plan in plans}) == 1  # one index for the four programs
    assert len({plan[-1].key for plan in plans}) == 4  # but four different evaluations
    everywhere = [plan_steps(load_spec(path)) for path in SPECS]
    assert len({plan[0].key for plan in everywhere}) == 1  # one encoder for the three data sets
    assert len({plan[1].key for plan in everywhere}) == 3  # and an index for each


def test_keys_change_with_the_data_and_only_downstream(tmp_path, data_dir):
    spec_path = write_tiny_experiment(tmp_path, data_dir)
    before = {s.label + s.kind: s.key for s in plan_steps(load_spec(spec_path))}
    spec_path.write_text(spec_path.read_text().replace("settings = { k = 2 }", "settings = { k = 1 }"))
    after = {s.label + s.kind: s.key for s in plan_steps(load_spec(spec_path))}
    assert before["uncompiledevaluate"] == after["uncompiledevaluate"]
    assert before["labeledcompile"] != after["labeledcompile"]
    assert before["labeledevaluate"] != after["labeledevaluate"]



def test_the_retriever_over_a_colbert_index_is_part_of_the_searching_steps_keys():
    path = next(p for p in SPECS if p.stem == "musique-rag")
    spec = load_spec(path)
    assert spec.index.retriever == "hybrid"  # the default searcher
    hybrid = {s.label + s.kind: s.key for s in plan_steps(spec)}
    spec.index.retriever = "colbert"
    colbert = {s.label + s.kind: s.key for s in plan_steps(spec)}
    assert colbert["indexindex"] == hybrid["indexindex"]  # one index, searched two ways
    assert colbert["uncompiledevaluate"] != hybrid["uncompiledevaluate"]


def test_encoder_training_files_take_a_limit_each_and_it_is_part_of_the_key(tmp_path, data_dir):
    path = next(p for p in SPECS if p.stem == "musique-rag")
    text = path.read_text()
    start, end = text.index("[index.encoder]"), text.index("[program]")
    encoder = ('[index.encoder]\ntrain = ["musique/train.jsonl", { file = "2wikimultihopqa/train.jsonl", limit = 40 }]\n'
               "limit = 30\nsteps = 10\n\n")
    mine = tmp_path / "musique-rag.toml"
    mine.write_text(text[:start] + encoder + text[end:])
    spec = load_spec(mine)
    assert [item.file.name for item in spec.index.encoder.train] == ["train.jsonl", "train.jsonl"]
    assert spec.index.encoder.train_limits() == [30, 40]  # the file's own limit, else the shared one
    before = plan_steps(spec)[0].key
    mine.write_text(mine.read_text().replace("limit = 40", "limit = 41"))
    assert plan_steps(load_spec(mine))[0].key != before


def test_a_sampled_slice_draws_the_same_questions_in_file_order_and_names_its_draw(data_dir):
    train = data_dir / "hotpotqa" / "train.jsonl"
    whole = load_source(QuestionSource(file=train, offset=1200, limit=79))
    drawn = load_source(QuestionSource(file=train, offset=1200, limit=79, sample=24))
    assert len(drawn) == 24 and len({q.id for q in drawn}) == 24
    positions = [[q.id for q in whole].index(q.id) for q in drawn]
    assert positions == sorted(positions)  # file order kept
    assert [q.id for q in drawn] == [q.id for q in load_source(QuestionSource(file=train, offset=1200, limit=79,
                                                                              sample=24))]
    reseeded = load_source(QuestionSource(file=train, offset=1200, limit=79, sample=24, sample_seed=1))
    assert [q.id for q in reseeded] != [q.id for q in drawn]
    # The checked-in HotpotQA validation draw has dev's share of comparison questions (52 of 300), unlike the
    # first 24 questions of the slice (one).
    assert sum(q.type == "comparison" for q in whole[:24]) == 1
    assert sum(q.type == "comparison" for q in drawn) == 4
    with pytest.raises(ApexError, match=r"train.jsonl\[1200:1279\] \(sample 80, seed 0\): sample 80 is larger "
                                        r"than the slice \(79 questions\)"):
        load_source(QuestionSource(file=train, offset=1200, limit=79, sample=80))


def test_a_slice_without_a_sample_keeps_its_key_and_a_sample_changes_it(data_dir):
    train = data_dir / "hotpotqa" / "train.jsonl"
    plain = source_identity(QuestionSource(file=train, offset=1200, limit=24))
    assert set(plain) == {"hub", "split", "offset", "limit", "sha256"}  # as before 'sample' existed
    assert source_identity(QuestionSource(file=train, offset=1200, limit=79, sample=24))["sample"] == 24


def test_how_a_trainer_stage_runs_is_not_part_of_its_key(tmp_path, data_dir):
    """Checkpointing, threads and micro-batches do not change what a GRPO stage computes: changing them keeps
    the stage's key (a long stage can be re-run with less memory and resume), its reward or rate does not."""
    grpo = '\n[[optimizer.stages]]\nkind = "grpo"\n[optimizer.stages.settings]\nmodule = "reader.generate"\n{}\n'

    def keys(settings: str) -> dict[str, str]:
        spec_path = write_tiny_experiment(tmp_path / settings.replace(" ", "").replace("\n", "_"), data_dir,
                                          extra=grpo.format(settings))
        return {s.label + s.kind: s.key for s in plan_steps(load_spec(spec_path))}

    base = keys("max_steps = 4")
    same = keys("max_steps = 4\nsave_steps = 1\nmicro_batch_size = 2\nnum_threads = 1\nlogging_steps = 2")
    changed = keys("max_steps = 4\nlearning_rate = 1e-4")
    assert same == base
    assert changed["labeled+grpocompile"] != base["labeled+grpocompile"]
    assert changed["labeledcompile"] == base["labeledcompile"]

def test_a_users_own_stage_kind_names_its_own_execution_settings(tmp_path, data_dir, monkeypatch):
    from apexdsp.experiments.stages import STAGE_KINDS, StageKind

    monkeypatch.setitem(STAGE_KINDS, "mine", StageKind("mine", "my_optimizers:Mine", lambda p, s, c: p,
                                                       "a user's optimizer", execution_settings=frozenset({"workers"})))
    mine = '\n[[optimizer.stages]]\nkind = "mine"\n[optimizer.stages.settings]\n{}\n'

    def key(settings: str) -> str:
        spec_path = write_tiny_experiment(tmp_path / settings.replace(" ", "").replace("\n", "_"), data_dir,
                                          extra=mine.format(settings))
        steps = plan_steps(load_spec(spec_path))
        return next(s.key for s in steps if s.label == "labeled+mine" and s.kind == "compile")

    assert key("depth = 2\nworkers = 1") == key("depth = 2\nworkers = 8") != key("depth = 3\nworkers = 1")
    # the built-in trainer settings are GRPO's and SFT's, not every stage's
    assert key("depth = 2\nsave_steps = 1") != key("depth = 2")


BAD = [
    ("unknown top-level key", ("[program]", "colour = 'red'\n[program]"), "colour: unknown key"),
    ("unknown nested key", ('kind = "bm25"', 'kind = "bm25"\ncorpora = "x"'), "index.corpora: unknown key"),
    ("unknown retriever", ('kind = "bm25"', 'kind = "bm25"\nretriever = "splade"'), "index.retriever: Input should be"),
    ("retriever over bm25", ('kind = "bm25"', 'kind = "bm25"\nretriever = "hybrid"'),
     "'retriever' chooses what searches a colbert index"),
    ("wrong type", ("threads = 4", 'threads = "four"'), "evaluation.threads: Input should be a valid integer"),
    ("missing file", ('corpus = "corpus.jsonl"', 'corpus = "nowhere.jsonl"'),
     "index.corpus: file 'nowhere.jsonl' not found"),
    ("unknown program", ('name = "rag"', 'name = "ragg"'), "program.name: unknown program 'ragg'"),
    ("bad program option", ("answer_tokens = 12", "answer_tokenz = 12"), "program: program 'rag': bad option"),
    ("unknown stage kind", ('kind = "labeled"', 'kind = "grop"'), "optimizer.stages[0].kind: unknown stage kind 'grop'"),
    ("bad stage setting", ("settings = { k = 2 }", "settings = { kk = 2 }"),
     "optimizer.stages[0]: settings.kk: unknown setting"),
    ("unknown metric", ('metrics = ["em", "f1", "hit"]', 'metrics = ["em", "bleu"]'), "evaluation.metrics[1]"),
    ("test overlaps train", ("offset = 2, limit = 2", "offset = 1, limit = 2"), "data: train overlaps test"),
    ("unknown LM module", ("[program.options]", '[lm]\nmodules = { planner = "smollm2-135m" }\n[program.options]'),
     "lm.modules.planner: program 'rag' has no module 'planner'"),
    ("evaluation after unknown stage", ("threads = 4", 'threads = 4\nafter = ["grpo"]'),
     "evaluation.after: 'grpo' is not 'uncompiled' or a stage"),
    ("not toml", ("[program]", "[program"), "not valid TOML"),
]


@pytest.mark.parametrize(("case", "edit", "message"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path, data_dir, case, edit, message):
    spec_path = write_tiny_experiment(tmp_path, data_dir)
    text = spec_path.read_text()
    assert edit[0] in text
    spec_path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ApexError) as error:
        load_spec(spec_path)
    text = str(error.value)
    assert text.startswith(f"{spec_path.name}: ") and message in text and "\n" not in text, text


def test_grpo_settings_are_checked_against_the_optimizer(tmp_path, data_dir):
    spec_path = write_tiny_experiment(tmp_path, data_dir, extra=(
        '\n[[optimizer.stages]]\nkind = "grpo"\nsettings = { module = "reader.generate", reward = "nope" }\n'))
    with pytest.raises(ApexError, match=r"optimizer.stages\[1\]: settings.reward: unknown reward 'nope'"):
        load_spec(spec_path)


def test_a_grpo_stage_takes_a_module_reward_and_an_sft_stage_a_trajectory_reward(tmp_path, data_dir):
    # GRPO scores one module's completions, SFT filters whole runs: "answer_f1" is a run reward only
    grpo = write_tiny_experiment(tmp_path / "grpo", data_dir, extra=(
        '\n[[optimizer.stages]]\nkind = "grpo"\nsettings = { module = "reader.generate", reward = "answer_f1" }\n'))
    with pytest.raises(ApexError, match=r"settings.reward: unknown reward 'answer_f1'; known: answer, decomposition"):
        load_spec(grpo)
    grpo.write_text(grpo.read_text().replace('reward = "answer_f1"', 'reward = "answer"'))
    assert load_spec(grpo).optimizer.stages[1].settings["reward"] == "answer"
    sft = write_tiny_experiment(tmp_path / "sft", data_dir, extra=(
        '\n[[optimizer.stages]]\nkind = "sft"\nsettings = { modules = ["reader"], reward = "answer" }\n'))
    with pytest.raises(ApexError, match=r"settings.reward: unknown reward 'answer'; known: answer_em, answer_f1"):
        load_spec(sft)


def test_a_trained_module_must_name_one_predictor_before_any_work(tmp_path, data_dir):
    # rag's reader has three predictors (open, yes/no, A/B): GRPO on "reader" is ambiguous, found at load time
    spec_path = write_tiny_experiment(tmp_path, data_dir, extra=(
        '\n[[optimizer.stages]]\nkind = "grpo"\nsettings = { module = "reader", reward = "answer" }\n'))
    with pytest.raises(ApexError, match=r"optimizer.stages\[1\]: settings.module: module 'reader' has 3 predictors "
                                        r"\(reader.generate, reader.decide, reader.choose\); name one of them"):
        load_spec(spec_path)
    spec_path.write_text(spec_path.read_text().replace('module = "reader"', 'module = "planner"'))
    with pytest.raises(ApexError, match=r"settings.module: program has no module 'planner'"):
        load_spec(spec_path)
    spec_path.write_text(spec_path.read_text().replace('module = "planner"', 'module = "reader.generate"'))
    assert load_spec(spec_path).optimizer.stages[1].settings["module"] == "reader.generate"


def test_missing_spec_file(tmp_path):
    with pytest.raises(ApexError, match="not found"):
        load_spec(Path(tmp_path / "absent.toml"))


def test_cli_reports_a_bad_spec_without_traceback(tmp_path, data_dir, capsys):
    from apexdsp.cli import main

    spec_path = write_tiny_experiment(tmp_path, data_dir)
    spec_path.write_text(spec_path.read_text().replace('name = "rag"', 'name = "nope"'))
    assert main(["run", str(spec_path)]) == 2
    err = capsys.readouterr().err
    assert "program.name: unknown program 'nope'" in err and "Traceback" not in err


def test_cli_checks_every_spec_before_running_the_first(tmp_path, data_dir, capsys):
    from apexdsp.cli import main

    good = write_tiny_experiment(tmp_path / "good", data_dir, name="good-rag")
    bad = write_tiny_experiment(tmp_path / "bad", data_dir, name="bad-rag")
    bad.write_text(bad.read_text().replace("threads = 4", "threads = 0"))
    cache = tmp_path / "cache"
    assert main(["run", str(good), str(bad), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "evaluation.threads" in err and "Traceback" not in err
    assert not cache.exists() or not any(cache.glob("evaluate-*"))  # the good spec did not start


def test_cli_check_lists_the_steps_of_each_spec(tmp_path, data_dir, capsys):
    from apexdsp.cli import main

    first = write_tiny_experiment(tmp_path / "one", data_dir, name="one-rag")
    second = write_tiny_experiment(tmp_path / "two", data_dir, name="two-rag")
    assert main(["run", str(first), str(second), "--check", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "one-rag" in out and "two-rag" in out and out.count("to do") == 6


def test_runs_record_data_files_relative_to_the_data_folder(tmp_path, monkeypatch, data_dir):
    """Params name a data file the same way on every machine and checkout (``hotpotqa/dev.jsonl``)."""
    from apexdsp.paths import recorded_path
    from apexdsp.tracking.provenance import data_file_params

    dev = data_dir / "hotpotqa" / "dev.jsonl"
    elsewhere = tmp_path / "mine" / "questions.jsonl"
    elsewhere.parent.mkdir()
    elsewhere.write_text('{"id": "1"}\n')
    monkeypatch.chdir(tmp_path / "mine")
    assert recorded_path(dev) == "hotpotqa/dev.jsonl"
    assert recorded_path(elsewhere) == "questions.jsonl"  # under the working directory: relative to it
    monkeypatch.chdir(data_dir.parent)
    assert recorded_path(elsewhere) == str(elsewhere.resolve())  # neither: absolute
    assert data_file_params({"questions": dev})["questions"] == "hotpotqa/dev.jsonl"
    source = QuestionSource(file=dev, offset=10, limit=20)
    assert source.describe() == "hotpotqa/dev.jsonl[10:30]"
