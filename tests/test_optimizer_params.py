"""Every optimizer's ``get_params()`` gives its settings as plain values (what MLflow's DSPy autolog logs and
a JSON file holds): no retriever, metric or reward object, for a real index and a user's metric."""

from __future__ import annotations

import json

from apexdsp.optimizers import (BootstrapConfig, ModuleGRPO, ModuleGRPOConfig, ModuleSFT, RewardBootstrap,
                                SFTStageConfig)
from apexdsp.optimizers.calibration import ChoiceCalibration
from apexdsp.optimizers.schedule import ProgressiveSchedule, Stage

PLAIN = (str, int, float, bool, type(None))


def plain_values(value, where="params"):
    """The paths of every value below ``value`` that is not a string, number, bool, None, list (or tuple) or
    dict with string keys."""
    if isinstance(value, PLAIN):
        return []
    if isinstance(value, (list, tuple)):
        return [bad for i, item in enumerate(value) for bad in plain_values(item, f"{where}[{i}]")]
    if isinstance(value, dict):
        keys = [f"{where} key {key!r}" for key in value if not isinstance(key, str)]
        return keys + [bad for key, item in value.items() for bad in plain_values(item, f"{where}.{key}")]
    return [f"{where}: {type(value).__name__}"]


def found_it(example, prediction, trace=None):
    return example.answer.lower() in str(prediction.answer).lower()


def short_queries(question, outputs, completion):
    return 1.0 / (1 + len(str(outputs.get("query", "")).split()))


def test_every_optimizer_gives_its_settings_as_plain_values(tmp_path, paragraphs_index):
    _, retriever = paragraphs_index
    sft = ModuleSFT(tmp_path, SFTStageConfig(source="traces", max_steps=2, use_lora=True, train_layers=None),
                    modules=("read",), retriever=retriever, metric=found_it)
    schedule = ProgressiveSchedule([Stage("sft", "executor.analyze", sft=SFTStageConfig(max_examples=50)),
                                    Stage("grpo", "planner", grpo=ModuleGRPOConfig(max_steps=3)),
                                    Stage("grpo", "write_queries", "frozen_generator", name="queries",
                                          reward_options={"reader": retriever}),
                                    Stage("calibrate", "choices")], tmp_path, retriever=retriever)
    optimizers = {
        "bootstrap": RewardBootstrap(BootstrapConfig(num_candidates=2), retriever=retriever, metric=found_it),
        "calibration": ChoiceCalibration(),
        "grpo": ModuleGRPO(tmp_path, ModuleGRPOConfig(max_steps=1), module="search", reward=short_queries,
                           retriever=retriever),
        "sft": sft, "schedule": schedule}
    for name, optimizer in optimizers.items():
        params = optimizer.get_params()
        assert plain_values(params) == [], name
        assert "Retriever object" not in json.dumps(params), name

    params = sft.get_params()
    assert params["modules"] == ["read"] and params["metric"] == "found_it" and params["out_dir"] == str(tmp_path)
    assert params["sft.source"] == "traces" and params["sft.max_steps"] == 2
    assert params["sft.lora_target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]

    stages = schedule.get_params()["stages"]
    assert [(s["kind"], s["module"], s["reward"]) for s in stages] == [
        ("sft", "executor.analyze", None), ("grpo", "planner", "decomposition"),
        ("grpo", "write_queries", "frozen_generator"), ("calibrate", "choices", None)]
    assert stages[0]["sft"]["max_examples"] == 50 and stages[0]["grpo"] is None
    assert stages[1]["grpo"]["max_steps"] == 3 and stages[2]["name"] == "queries"
    assert stages[2]["reward_options"] == {"reader": retriever.name}  # an object by its name, never itself
