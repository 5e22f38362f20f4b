"""Progressive schedules (OPERA's MAPGRPO, QAgent's stages): weight stages one after another, each on the
program as the stages before it left it, on the tiny random Llama of ``test_grpo``."""

from __future__ import annotations

import json

import mlflow

from apexdsp.optimizers.schedule import ProgressiveSchedule, Stage, parse_stages
from tests.test_grpo import PlanOnly, questions, tiny_config, tiny_lm  # noqa: F401 - shared fixtures


def test_schedule_trains_stages_in_order_and_skips_finished_ones(tiny_lm, questions, tmp_path):
    stages = [Stage("grpo", "planner", "decomposition", name="stage1", grpo=tiny_config(max_steps=1)),
              Stage("grpo", "planner", "decomposition", name="stage2", grpo=tiny_config(max_steps=1))]
    schedule = ProgressiveSchedule(stages, tmp_path / "out")
    trained = schedule.compile(PlanOnly(), trainset=questions)
    first, second = schedule.results
    assert trained.planner.write_plan.lm.engine.model_dir == second.weights.resolve()
    manifest = json.loads((second.weights / "apexdsp-trained.json").read_text())
    assert manifest["base_model"] == str(first.weights.resolve())  # stage 2 started from stage 1's weights
    again = ProgressiveSchedule(stages, tmp_path / "out")
    again.compile(PlanOnly(), trainset=questions)
    assert all(r.reused for r in again.results)


def test_mapgrpo_trains_two_modules_one_after_another(tiny_lm, paragraphs_index, tmp_path):
    """OPERA's progressive schedule on a real APEX program: the planner, then the executor's analysis-answer
    step on prompts collected by running the program with the trained planner; each module ends on its
    own trained weights, each stage logs its reward curve."""
    from apexdsp.programs.registry import build_program

    records, retriever = paragraphs_index
    program = build_program("apex", retriever=retriever, max_reflections=0, max_rewrites=0)
    stages = parse_stages("mapgrpo", tiny_config(max_steps=1), program="apex")
    assert [(s.module, s.resolved_reward()) for s in stages] == [
        ("planner.write_plan", "decomposition"), ("executor.analyze", "answer"),
        ("executor.rewrite", "frozen_generator")]
    schedule = ProgressiveSchedule(stages[:2], tmp_path / "out", retriever=retriever)
    trained = schedule.compile(program, trainset=records[:2])

    weights = tmp_path / "out" / "weights"
    assert trained.planner.write_plan.lm.engine.model_dir == (weights / "planner.write_plan").resolve()
    assert trained.executor.analyze.lm.engine.model_dir == (weights / "executor.analyze").resolve()
    assert trained.executor.rewrite.lm is None and program.planner.write_plan.lm is None  # others untouched
    prompts = json.loads((tmp_path / "out" / "grpo" / "executor.analyze" / "prompts.json").read_text())["prompts"]
    assert prompts and all(p["module"] == "executor.analyze" for p in prompts)
    assert [r.module for r in schedule.results] == ["planner.write_plan", "executor.analyze"]
    for result in schedule.results:
        assert (tmp_path / "out" / "grpo" / result.module / "reward_curve.png").is_file()
        metrics = mlflow.tracking.MlflowClient().get_run(result.run_id).data.metrics
        assert "reward" in metrics
