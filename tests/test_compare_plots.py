"""What `apexdsp compare` shows: its rows in table order, and reward curves of mean rewards only (not
spreads, shares or timings)."""

from __future__ import annotations

import mlflow

from apexdsp.experiments.compare import ComparedRun, _latest_per_step, reward_histories, write_plots


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


def _run(run_id: str, program: str, stage: str, start_time: int, step_key: str | None = None) -> ComparedRun:
    return ComparedRun(run_id=run_id, name=run_id, experiment_id="0", parent_id=None,
                       params={"program": program, "stage": stage}, metrics={}, start_time=start_time,
                       tags={"apexdsp.kind": "step", "apexdsp.step_key": step_key or run_id})


def test_the_table_groups_runs_by_program_with_stages_in_compile_order():
    # Two experiments run side by side over two sessions: start times interleave rag and opera, and
    # rag's uncompiled evaluation was logged again (into a later parent) after its GRPO row.
    runs = [_run("rag-0", "rag", "uncompiled", 1, step_key="rag-uncompiled"),
            _run("opera-0", "opera", "uncompiled", 2),
            _run("rag-2", "rag", "bootstrap+grpo", 3),
            _run("opera-1", "opera", "bootstrap", 4),
            _run("rag-1", "rag", "bootstrap", 5),
            _run("rag-0-again", "rag", "uncompiled", 6, step_key="rag-uncompiled")]
    ordered = _latest_per_step(runs)
    assert [run.run_id for run in ordered] == ["rag-0-again", "rag-1", "rag-2", "opera-0", "opera-1"]
