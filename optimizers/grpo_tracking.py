"""What a GRPO run reports: per-step metrics in MLflow, where the time goes, groups with no signal, and
the reward curve.

TRL's ``GRPOTrainer`` already computes the numbers that matter per step (``reward``, ``reward_std``,
``kl``, completion lengths, ``frac_reward_zero_std``, ``rewards/<name>/mean``) and apexdsp's reward
function adds each reward component and the parse-failure rate; :class:`MlflowStepLogger` sends every
logged number to the *active* MLflow run (the compile's own run, or its stage's child run) instead of
letting TRL's integration open runs of its own. :class:`TimedGRPOTrainer` splits each step's time into
generation, reward, log-probability scoring and loss + backward, which is what decides where speed-ups
pay.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback
from trl import GRPOTrainer

logger = logging.getLogger(__name__)

_MLFLOW_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. /]")
TIME_KEYS = ("time/generation_s", "time/reward_s", "time/scoring_s", "time/loss_backward_s", "time/step_s")


class TimedGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` that records, per step, seconds spent generating, scoring rewards, computing the
    old/reference log-probabilities, and in loss + backward (``time/*`` metrics)."""

    def _timed(self, key: str, start: float) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][key].append(time.perf_counter() - start)

    def _generate(self, prompts):
        start = time.perf_counter()
        try:
            return super()._generate(prompts)
        finally:
            self._timed("time/generation_s", start)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        start = time.perf_counter()
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._timed("time/reward_s", start)

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        result = super().training_step(model, inputs, num_items_in_batch)
        self._timed("time/step_s", start)
        return result

    def _prepare_inputs(self, generation_batch):
        start = time.perf_counter()
        mode = "train" if self.model.training else "eval"
        before = {k: sum(self._metrics[mode].get(k, [])) for k in ("time/generation_s", "time/reward_s")}
        result = super()._prepare_inputs(generation_batch)
        spent = time.perf_counter() - start
        inner = sum(sum(self._metrics[mode].get(k, [])) - v for k, v in before.items())
        self._metrics[mode]["time/scoring_s"].append(max(0.0, spent - inner))
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        steps = self._metrics[mode].get("time/step_s", [])
        prepared = self._metrics[mode].get("time/generation_s", []) + self._metrics[mode].get("time/reward_s", []) \
            + self._metrics[mode].get("time/scoring_s", [])
        if steps:  # what training_step spent outside generation, rewards and scoring: loss + backward
            self._metrics[mode]["time/loss_backward_s"] = [max(0.0, (sum(steps) - sum(prepared)) / len(steps))]
        super().log(logs, start_time)


def mlflow_key(name: str) -> str:
    """A TRL log key as a valid MLflow metric name (``profiling/Time taken: X`` has a colon)."""
    return _MLFLOW_UNSAFE.sub("_", name)


class MlflowStepLogger(TrainerCallback):
    """Logs every numeric value of each training log to the active MLflow run, at the trainer's step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import mlflow

        if not logs or mlflow.active_run() is None:
            return
        metrics = {mlflow_key(k): float(v) for k, v in logs.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if metrics:
            mlflow.log_metrics(metrics, step=state.global_step)


@dataclass
class ZeroSignalReport:
    """How many logged steps had groups where every completion scored the same (no advantage, no gradient)."""

    steps: int = 0
    mean_fraction: float = 0.0
    all_zero_steps: int = 0
    fractions: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"zero_std/mean_fraction": self.mean_fraction, "zero_std/all_zero_steps": float(self.all_zero_steps),
                "zero_std/logged_steps": float(self.steps)}


class ZeroSignalMonitor(TrainerCallback):
    """Collects TRL's ``frac_reward_zero_std`` and warns when (nearly) every group had no signal.

    A group whose completions all score the same gets zero advantage: the step trains on nothing. One
    such step is normal; a run where it is the rule means the reward cannot tell this module's samples
    apart (too easy, too hard, or too coarse), and more steps will not help.
    """

    def __init__(self, threshold: float = 0.95, module: str = ""):
        self.threshold = threshold
        self.module = module
        self.report = ZeroSignalReport()

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get("frac_reward_zero_std")
        if value is None or not math.isfinite(value):
            return
        report = self.report
        report.fractions.append(float(value))
        report.steps = len(report.fractions)
        report.mean_fraction = sum(report.fractions) / report.steps
        report.all_zero_steps += int(value >= 1.0)
        if value >= self.threshold:
            logger.warning("GRPO %s step %d: %.0f%% of groups scored every completion the same (no learning signal)",
                           self.module, state.global_step, 100 * value)

    def warning(self) -> str | None:
        """A one-line warning when the run as a whole had (nearly) no learning signal."""
        if self.report.steps and self.report.mean_fraction >= self.threshold:
            return (f"GRPO on {self.module}: {100 * self.report.mean_fraction:.0f}% of prompt groups had identical "
                    f"rewards over {self.report.steps} steps: the reward gave (almost) no learning signal")
        return None


def reward_curve_figure(log_history: list[dict[str, Any]], title: str = "GRPO reward"):
    """Mean reward per step with its spread (±std) and each reward component's mean (matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in log_history if "reward" in row and "step" in row]
    figure, axis = plt.subplots(figsize=(7, 4))
    if rows:
        steps = [row["step"] for row in rows]
        mean = [row["reward"] for row in rows]
        std = [row.get("reward_std", 0.0) or 0.0 for row in rows]
        axis.plot(steps, mean, marker="o", color="black", label="reward (mean)")
        axis.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color="grey", alpha=0.25, label="± std")
        components = sorted({k for row in rows for k in row if k.startswith("components/") and k.endswith("/mean")})
        for key in components:
            points = [(row["step"], row[key]) for row in rows if key in row]
            axis.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", linewidth=1,
                      label=key.removeprefix("components/").removesuffix("/mean"))
    axis.set_xlabel("step")
    axis.set_ylabel("reward")
    axis.set_title(title)
    axis.legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure


def timing_summary(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each timed part over the logged steps (``time/*``)."""
    summary = {}
    for key in TIME_KEYS:
        values = [row[key] for row in log_history if isinstance(row.get(key), (int, float))]
        if values:
            summary[key] = sum(values) / len(values)
    return summary


__all__ = ["MlflowStepLogger", "TimedGRPOTrainer", "ZeroSignalMonitor", "ZeroSignalReport", "mlflow_key",
           "reward_curve_figure", "timing_summary"]
