"""Figures of ``apexdsp compare``: a metric per program and stage, and the reward curves of GRPO stages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: figures are written to files and MLflow
    import matplotlib.pyplot as plt

    return plt


def metric_bars(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> Any:
    """Grouped bars: one panel per metric, programs on the x axis, one bar per stage."""
    plt = _pyplot()
    programs = list(dict.fromkeys(str(row.get("program", "?")) for row in rows))
    stages = list(dict.fromkeys(str(row.get("stage", "?")) for row in rows))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    width = 0.8 / max(1, len(stages))
    for axis, metric in zip(axes[0], metrics):
        for position, stage in enumerate(stages):
            values = []
            for program in programs:
                found = [r["metrics"].get(metric) for r in rows if str(r.get("program")) == program
                         and str(r.get("stage")) == stage and r["metrics"].get(metric) is not None]
                values.append(found[0] if found else 0.0)
            offsets = [i + (position - (len(stages) - 1) / 2) * width for i in range(len(programs))]
            axis.bar(offsets, values, width=width, label=stage)
        axis.set_xticks(range(len(programs)), programs)
        axis.set_title(metric.upper())
        axis.set_ylim(0, max(0.05, axis.get_ylim()[1]))
        axis.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(title="stage", fontsize=8)
    figure.tight_layout()
    return figure


def reward_curves(curves: Mapping[str, Sequence[tuple[int, float]]]) -> Any:
    """One line per (run, reward metric): the reward over training steps."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for label, points in curves.items():
        steps, values = zip(*sorted(points)) if points else ((), ())
        axis.plot(steps, values, marker="o", markersize=2, label=label)
    axis.set_xlabel("GRPO step")
    axis.set_ylabel("reward")
    axis.grid(alpha=0.3)
    if curves:
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
