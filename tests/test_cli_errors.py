"""User errors end in one line on stderr, a non-zero exit and no traceback (the console script, for real)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

APEXDSP = str(Path(sys.executable).parent / "apexdsp")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([APEXDSP, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    message = " ".join(lines)
    assert message.startswith("error:"), result.stderr
    for needle in needles:
        assert needle in message, message


@pytest.fixture
def questions(tmp_path) -> Path:
    good = {"id": "q1", "question": "Who wrote Hamlet?", "answer": "Shakespeare"}
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"id": "q2", "question": "Broken"' + "\n")
    return path


def test_missing_questions_file(tmp_path):
    result = run_cli("evaluate", "--program", "vanilla", "--questions", str(tmp_path / "nope.jsonl"))
    assert_one_line_error(result, "nope.jsonl")


def test_malformed_jsonl_line_names_file_and_line(questions):
    result = run_cli("evaluate", "--program", "vanilla", "--questions", str(questions))
    assert_one_line_error(result, "questions.jsonl", "line 2")


def test_record_without_answer_names_the_field(tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "Who?"}) + "\n")
    result = run_cli("evaluate", "--program", "vanilla", "--questions", str(path))
    assert_one_line_error(result, "noanswer.jsonl", "line 1", "answer")


def test_unknown_program(data_dir):
    result = run_cli("evaluate", "--program", "nosuch", "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"),
                     "--limit", "1", "--no-track")
    assert_one_line_error(result, "nosuch", "vanilla")


def test_unknown_model_name(data_dir):
    result = run_cli("evaluate", "--program", "vanilla", "--lm", "no-such-model",
                     "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "1", "--no-track")
    assert_one_line_error(result, "no-such-model", "smollm2-135m")


def test_program_that_searches_needs_an_index(data_dir):
    result = run_cli("evaluate", "--program", "rag", "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"),
                     "--limit", "1", "--no-track")
    assert_one_line_error(result, "--index")


@pytest.mark.parametrize("optimizer, needle", [("grpo(planner)+bootstrap", "comes first"),
                                               ("bootstrap+grpo(", "bad stage 'grpo('")])
def test_compile_optimizer_stages_are_checked_before_any_work(data_dir, optimizer, needle):
    result = run_cli("compile", "--optimizer", optimizer, "--trainset", str(data_dir / "hotpotqa" / "train.jsonl"),
                     "--no-track")
    assert_one_line_error(result, needle)


def test_compile_weight_stages_parse_into_grpo_and_sft_stages():
    from apexdsp.cli.compile_cmd import weight_stages

    assert weight_stages("bootstrap", 5, 0.0) == []
    alone = weight_stages("grpo(write_queries)", 5, 0.0)  # weight stages alone train the uncompiled program
    assert [(s.kind, s.module) for s in alone] == [("grpo", "write_queries")]
    stages = weight_stages("bootstrap+grpo(planner)+sft(executor)", 5, 0.0)
    assert [(s.kind, s.module) for s in stages] == [("grpo", "planner"), ("sft", "executor")]
    assert stages[0].grpo.max_steps == 5 and stages[0].grpo.beta == 0.0


def test_compile_start_from_takes_weight_stages_only(tmp_path):
    from apexdsp.cli.compile_cmd import weight_stages
    from apexdsp.errors import ApexError

    stages = weight_stages("grpo(planner)", 3, 0.0, 2e-5, start_from=tmp_path)
    assert [(s.kind, s.module) for s in stages] == [("grpo", "planner")]
    assert stages[0].grpo.learning_rate == 2e-5
    assert stages[0].resolved_reward() == "decomposition"  # the planner's one predictor has that default
    with pytest.raises(ApexError, match="names no reward"):  # the executor's predictors have different ones
        weight_stages("grpo(executor)", 3, 0.0, start_from=tmp_path)[0].resolved_reward()
    with pytest.raises(ApexError, match="already compiled"):
        weight_stages("bootstrap+grpo(planner)", 3, 0.0, start_from=tmp_path)


def test_compile_start_from_never_overwrites_its_source(data_dir, tmp_path):
    result = run_cli("compile", "--optimizer", "grpo(planner)", "--start-from", str(tmp_path / "c"),
                     "--out", str(tmp_path / "c"), "--trainset", str(data_dir / "hotpotqa" / "train.jsonl"),
                     "--no-track")
    assert_one_line_error(result, "is --start-from")


def test_program_options_read_json_values_and_name_a_malformed_pair():
    from apexdsp.cli.inputs import program_options
    from apexdsp.errors import ApexError

    assert program_options(["frozen_generator=smollm2-135m", "max_rounds=2", "k=5"]) == {
        "frozen_generator": "smollm2-135m", "max_rounds": 2, "k": 5}
    assert program_options(None) == {}
    with pytest.raises(ApexError, match="'max_rounds': expected KEY=VALUE"):
        program_options(["max_rounds"])


def test_unknown_program_option_is_named(data_dir):
    result = run_cli("evaluate", "--program", "vanilla", "--option", "no_such_option=1",
                     "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "1", "--no-track")
    assert_one_line_error(result, "no_such_option")


def test_grpo_seed_reaches_the_weight_stages():
    from apexdsp.cli.compile_cmd import weight_stages

    assert weight_stages("bootstrap+grpo(planner)", 3, 0.0, seed=7)[0].grpo.seed == 7


@pytest.mark.parametrize(("edit", "needles"), [
    ({"config.json": json.dumps({"model_type": "llama"})}, ("config.json has model_type 'llama'",)),
    ({"artifact.metadata": '{"dim": 128,\n oops'}, ("artifact.metadata line 2 is not valid JSON",)),
    ({"apexdsp-encoder.json": json.dumps({"format": 99})}, ("format 99", "upgrade apexdsp")),
], ids=["not-bert", "broken-metadata", "newer-format"])
def test_an_encoder_folder_from_another_version_is_refused_before_indexing(tmp_path, data_dir, edit, needles):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    files = {"model.safetensors": "", "artifact.metadata": json.dumps({"dim": 128}),
             "config.json": json.dumps({"model_type": "bert"}), **edit}
    for name, content in files.items():
        (encoder / name).write_text(content)
    result = run_cli("index", "build", "--corpus", str(data_dir / "musique" / "corpus.jsonl"),
                     "--encoder", str(encoder), "--out", str(tmp_path / "index"))
    assert_one_line_error(result, "encoder", *needles)
    assert not (tmp_path / "index").exists()


def test_index_eval_heldout_of_a_folder_without_a_training_record(tmp_path, data_dir):
    result = run_cli("index", "eval", "--index", str(tmp_path), "--questions",
                     str(data_dir / "musique" / "train.jsonl"), "--heldout-of", str(tmp_path), "--no-track")
    assert_one_line_error(result, "--heldout-of", "apexdsp-encoder.json")


def test_a_served_model_without_an_api_key_is_refused_before_any_question(data_dir):
    import os

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    result = subprocess.run([APEXDSP, "evaluate", "--program", "vanilla", "--lm", "openai/smollm2-135m",
                             "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"), "--limit", "1", "--no-track"],
                            capture_output=True, text=True, timeout=300,
                            env={**env, "OPENAI_API_BASE": "http://127.0.0.1:9"})
    assert_one_line_error(result, "OPENAI_API_KEY")
