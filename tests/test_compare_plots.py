"""The reward-curve figure of ``apexdsp compare`` plots mean rewards only (not spreads, shares or timings)."""

from __future__ import annotations

import mlflow

from apexdsp.experiments.compare import ComparedRun, reward_histories, write_plots


def test_reward_curves_hold_the_mean_reward_and_its_components(tmp_path):
    mlflow.set_experiment("curves")
    with mlflow.start_run(run_name="grpo") as run:
        for step in (1, 2, 3):
            mlflow.log_metrics({"reward": 0.1 * step, "rewards/decomposition/mean": 0.1 * step,
                                "reward_std": 0.2, "rewards/decomposition/std": 0.2, "frac_reward_zero_std": 0.5,
                                "time/reward_s": 3.0}, step=step)
    compared = ComparedRun(run_id=run.info.run_id, name="grpo", experiment_id=run.info.experiment_id, parent_id=None,
                           params={"program": "apex", "stage": "bootstrap+grpo"}, metrics={"em": 0.1, "f1": 0.2})
    curves = reward_histories([compared])
    assert sorted(curves) == ["grpo: reward", "grpo: rewards/decomposition/mean"]
    assert curves["grpo: reward"] == [(1, 0.1), (2, 0.2), (3, 0.30000000000000004)]
    written = write_plots([compared], ["em", "f1"], tmp_path)
    assert [path.name for path in written] == ["metrics_by_program_stage.png", "reward_curves.png"]
    assert all(path.stat().st_size > 5000 for path in written)
