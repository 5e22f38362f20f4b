"""What a rerun of a weight stage may reuse: trained weights only when trained with the same settings,
a checkpoint only when transformers finished writing it, and nothing a killed save left half-written.

The SFT tests train the tiny random-init Llama of ``test_grpo`` for a few steps; the checkpoint tests
read folders laid out as transformers saves them.
"""

from __future__ import annotations

import json
import logging

import pytest

from apexdsp.lm.adapter import TolerantChatAdapter
from apexdsp.optimizers.module_prompts import format_messages
from apexdsp.optimizers.sft import ModuleSFT, SFTExample, SFTStageConfig
from apexdsp.optimizers.trained_lm import (SETTINGS_DIGEST, read_manifest, remove_stale_saves, settings_digest,
                                           weights_dir)
from apexdsp.optimizers.trainer_checkpoints import SETTINGS_FILE, last_checkpoint
from tests.test_grpo import questions  # noqa: F401 - the shared fixture
from tests.test_sft import PlanAndAnswer, tiny_lm  # noqa: F401 - the shared fixture


def plan_examples(program, questions) -> list[SFTExample]:  # noqa: F811
    adapter = TolerantChatAdapter()
    predictor = program.planner.write_plan
    return [SFTExample("planner.write_plan", format_messages(predictor, {"question": q.question}, adapter),
                       adapter.format_assistant_message_content(predictor.signature, {"plan": "1. Who is it?"}))
            for q in questions[:2]]


def train(out, examples, learning_rate: float):
    config = SFTStageConfig(max_steps=2, batch_size=2, learning_rate=learning_rate, train_layers=1)
    optimizer = ModuleSFT(out, config, modules=("planner",))
    optimizer.compile(PlanAndAnswer(), examples=examples)
    weights = weights_dir(out, "planner")
    return read_manifest(weights), (weights / "model.safetensors").read_bytes(), optimizer.report


def test_sft_weights_are_reused_only_by_a_stage_with_the_same_settings(tiny_lm, questions, tmp_path,  # noqa: F811
                                                                       caplog):
    examples = plan_examples(PlanAndAnswer(), questions)
    first, first_weights, report = train(tmp_path / "out", examples, 1e-2)
    assert report["steps"] == 2 and first[SETTINGS_DIGEST]

    again, again_weights, report = train(tmp_path / "out", examples, 1e-2)
    assert report == {} and again == first and again_weights == first_weights  # reused: nothing trained

    with caplog.at_level(logging.WARNING, logger="apexdsp.optimizers.trained_lm"):
        changed, changed_weights, report = train(tmp_path / "out", examples, 5e-2)
    assert report["steps"] == 2, "a stage with another learning rate must train again"
    assert changed[SETTINGS_DIGEST] != first[SETTINGS_DIGEST] and changed_weights != first_weights
    assert "trained with other settings" in caplog.text

    other_examples, _, report = train(tmp_path / "out", examples[:1], 5e-2)
    assert report["steps"] == 2 and other_examples[SETTINGS_DIGEST] != changed[SETTINGS_DIGEST]


def test_the_digest_leaves_out_bookkeeping_and_counts_records_by_content(questions):  # noqa: F811
    base = SFTStageConfig()
    assert settings_digest(base, data=questions) == settings_digest(
        SFTStageConfig(resume=False, keep_checkpoints=True, save_steps=7, num_threads=5), data=questions)
    assert settings_digest(base, data=questions) != settings_digest(SFTStageConfig(seed=1), data=questions)
    edited = [questions[0].model_copy(update={"answer": "something else"}), *questions[1:]]
    assert settings_digest(base, data=questions) != settings_digest(base, data=edited)
    assert settings_digest(base, reward=object()) == settings_digest(base, reward=object())  # no address


def checkpoint(folder, step: int, state: str = '{"global_step": 1}', weights: bool = True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(state)
    if weights:
        (path / "model.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("broken", ["", '{"global_step": 4, "log_hi', "no state", "no weights"])
def test_a_checkpoint_cut_off_while_saved_is_passed_over_for_the_one_before(tmp_path, broken):
    whole = checkpoint(tmp_path, 2)
    if broken == "no state":
        (checkpoint(tmp_path, 4) / "trainer_state.json").unlink()
    else:
        checkpoint(tmp_path, 4, **({"weights": False} if broken == "no weights" else {"state": broken}))
    assert last_checkpoint(tmp_path) == whole
    (whole / "trainer_state.json").write_text("")
    assert last_checkpoint(tmp_path) is None
    assert last_checkpoint(tmp_path / "missing") is None


def test_checkpoints_saved_under_other_settings_are_not_resumed(tmp_path):
    folder = tmp_path / "checkpoints"
    assert last_checkpoint(folder, "aaa") is None
    assert json.loads((folder / SETTINGS_FILE).read_text()) == {"settings_digest": "aaa"}
    kept = checkpoint(folder, 2)
    assert last_checkpoint(folder, "aaa") == kept
    assert last_checkpoint(folder, "bbb") is None and not kept.exists()
    assert json.loads((folder / SETTINGS_FILE).read_text()) == {"settings_digest": "bbb"}


def test_what_a_killed_save_left_is_removed_and_nothing_else(tmp_path):
    weights = tmp_path / "weights"
    for name in (".reader-k2x_9abc", ".reader.old", ".reader-x-k2x_9abc", ".reader-x", "reader", "reader-x"):
        (weights / name).mkdir(parents=True)
    assert sorted(remove_stale_saves(weights / "reader")) == [".reader-k2x_9abc", ".reader.old"]
    assert sorted(p.name for p in weights.iterdir()) == [".reader-x", ".reader-x-k2x_9abc", "reader", "reader-x"]
