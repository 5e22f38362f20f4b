"""``apexdsp compare``: evaluation runs side by side (the params that differ, the metrics), with plots.

Runs are read back from MLflow (``MlflowClient``), never from the local cache, so the table shows what
the tracking store holds: an experiment's evaluation steps, or the runs named by id (a parent run of
``apexdsp run`` stands for its evaluation children). The plots (metric per program and stage, reward
curves of GRPO runs) are written to a folder and logged as artifacts of one ``compare`` run per set of
compared runs, which a later compare of the same runs updates instead of adding another.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexdsp.errors import ApexError
from apexdsp.experiments import plots

HIDDEN_PARAMS = {"step_key", "step_seconds"}  # differ between any two steps; say nothing about the setting


@dataclass
class ComparedRun:
    run_id: str
    name: str
    experiment_id: str
    parent_id: str | None
    params: dict[str, str]
    metrics: dict[str, float]
    start_time: int = 0
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def program(self) -> str:
        return self.params.get("program", "?")

    @property
    def stage(self) -> str:
        return self.params.get("stage", "uncompiled" if self.tags.get("apexdsp.kind") == "evaluate" else "?")

    def row(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "name": self.name, "program": self.program, "stage": self.stage,
                "params": self.params, "metrics": self.metrics}


def _client() -> Any:
    from mlflow.tracking import MlflowClient

    from apexdsp.tracking import configure_tracking, probe_tracking

    probe_tracking(configure_tracking(), "start it, or compare the runs of another tracking store")
    return MlflowClient()


def _compared(run: Any) -> ComparedRun:
    return ComparedRun(run.info.run_id, run.info.run_name or run.info.run_id, run.info.experiment_id,
                       run.data.tags.get("mlflow.parentRunId"), dict(run.data.params), dict(run.data.metrics),
                       run.info.start_time or 0, dict(run.data.tags))


def _is_evaluation(run: Any) -> bool:
    tags = run.data.tags
    return tags.get("apexdsp.step") == "evaluate" or tags.get("apexdsp.kind") == "evaluate"


def _stage_depth(stage: str) -> int:
    """How many compile stages a stage label chains: ``uncompiled`` 0, ``bootstrap`` 1, ``bootstrap+grpo`` 2."""
    return 0 if stage == "uncompiled" else len(stage.split("+"))


def _latest_per_step(runs: list[ComparedRun]) -> list[ComparedRun]:
    """One run per evaluation step (a step logged into two parents shows once, its latest run), in table order:
    programs in the order they were first run, each program's stages in compile order.

    Start time alone interleaves programs whose experiments ran side by side or over several sessions.
    """
    first_seen: dict[str, int] = {}
    chosen: dict[str, ComparedRun] = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        first_seen.setdefault(run.program, run.start_time)
        chosen[run.tags.get("apexdsp.step_key", run.run_id)] = run
    return sorted(chosen.values(),
                  key=lambda r: (first_seen[r.program], r.program, _stage_depth(r.stage), r.start_time))


def find_runs(experiment: str | None = None, run_ids: list[str] | None = None) -> list[ComparedRun]:
    """The finished evaluation runs of ``experiment``, or the runs ``run_ids`` (parents expanded)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    if bool(experiment) == bool(run_ids):
        raise ApexError("compare takes --experiment NAME or run ids, not both and not neither")
    found: list[ComparedRun] = []
    try:
        if experiment:
            record = client.get_experiment_by_name(experiment)
            if record is None:
                raise ApexError(f"no MLflow experiment named {experiment!r} in the tracking store")
            runs = client.search_runs([record.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                      max_results=5000)
            found = [_compared(run) for run in runs if _is_evaluation(run)]
        for run_id in run_ids or []:
            try:
                run = client.get_run(run_id)
            except MlflowException:
                raise ApexError(f"no MLflow run with id {run_id!r} in the tracking store") from None
            if run.data.tags.get("apexdsp.kind") == "experiment":
                children = client.search_runs([run.info.experiment_id], max_results=5000,
                                              filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")
                found += [_compared(child) for child in children if _is_evaluation(child)]
            else:
                found.append(_compared(run))
    except MlflowException as error:
        raise ApexError(f"MLflow tracking store is not usable: {error.message}") from None
    if not found:
        raise ApexError(f"no finished evaluation runs in {experiment or ', '.join(run_ids or [])}")
    return _latest_per_step(found)


def differing_params(runs: list[ComparedRun]) -> list[str]:
    keys = sorted({key for run in runs for key in run.params} - HIDDEN_PARAMS - {"program", "stage"})
    return [key for key in keys if len({run.params.get(key) for run in runs}) > 1]


def comparison(runs: list[ComparedRun], metrics: list[str]) -> dict[str, Any]:
    """What the table shows (also the ``--json`` output)."""
    params = differing_params(runs)
    return {"metrics": metrics, "differing_params": params,
            "runs": [{"run_id": run.run_id, "name": run.name, "program": run.program, "stage": run.stage,
                      "params": {key: run.params.get(key) for key in params},
                      "metrics": {metric: run.metrics.get(metric) for metric in metrics}} for run in runs]}


REWARD_CURVE = re.compile(r"^(reward|rewards/[^/]+/mean)$")


PAIRED_METRICS = ("em", "f1", "hit", "recall")


def _question_rows(run_id: str) -> list[dict[str, Any]]:
    """The per-question rows an evaluation run logged: ``report.json`` of an ``apexdsp run`` step, or the
    ``predictions.json`` table of ``apexdsp evaluate``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logged = {artifact.path for artifact in MlflowClient().list_artifacts(run_id)}
    if "report.json" in logged:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/report.json").get("results", [])
    if "predictions.json" in logged:
        return mlflow.load_table("predictions.json", run_ids=[run_id]).to_dict("records")
    return []


def _scores(rows: list[dict[str, Any]], metric: str) -> dict[str, float]:
    return {str(row["id"]): float(row[metric]) for row in rows if row.get(metric) is not None
            and row.get(metric) == row.get(metric)}  # NaN (a metric the row lacks) is not a score


def paired_rows(runs: list[ComparedRun], metrics: tuple[str, ...] = PAIRED_METRICS,
                seed: int = 0) -> list[dict[str, Any]]:
    """Each compiled run against its program's uncompiled run, question by question: the mean difference
    with its 95% bootstrap interval, and the wins and losses (:mod:`apexdsp.metrics.paired`)."""
    from apexdsp.metrics.paired import paired_by_id

    rows = []
    for program in dict.fromkeys(run.program for run in runs):
        mine = [run for run in runs if run.program == program]
        base = next((run for run in mine if run.stage == "uncompiled"), None)
        if base is None:
            continue
        base_rows = _question_rows(base.run_id)
        for run in mine:
            if run is base:
                continue
            rows_of_run = _question_rows(run.run_id)
            figures = {}
            for metric in metrics:
                a, b = _scores(base_rows, metric), _scores(rows_of_run, metric)
                if set(a) & set(b):
                    figures[metric] = paired_by_id(a, b, metric=metric, seed=seed).to_dict()
            rows.append({"program": program, "stage": run.stage, "against": "uncompiled",
                         "run_id": run.run_id, "base_run_id": base.run_id, "paired": figures})
    return rows


def reward_histories(runs: list[ComparedRun]) -> dict[str, list[tuple[int, float]]]:
    """Reward metrics logged at several steps by the runs of the compared experiments (GRPO stages).

    A curve an experiment step's run logs (from its cached result) is also in the stage run nested below
    it (logged live while training): it is drawn once, from the step's run."""
    client = _client()
    curves: dict[str, list[tuple[int, float]]] = {}
    for experiment_id in sorted({run.experiment_id for run in runs}):
        found = client.search_runs([experiment_id], max_results=5000)
        keys = {run.info.run_id: set(run.data.metrics) for run in found}
        for run in found:
            parent_keys = keys.get(run.data.tags.get("mlflow.parentRunId", ""), set())
            for key in run.data.metrics:
                if not REWARD_CURVE.match(key):  # the mean reward and its components, not spreads or timings
                    continue
                if key in parent_keys:  # the same curve, logged again by the step run above it
                    continue
                history = client.get_metric_history(run.info.run_id, key)
                if len(history) > 1:
                    curves[f"{run.info.run_name}: {key}"] = [(point.step, point.value) for point in history]
    return curves


def write_plots(runs: list[ComparedRun], metrics: list[str], out_dir: Path) -> list[Path]:
    """The PNGs (metric per program and stage; reward curves when any run has them)."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figure = plots.metric_bars([run.row() for run in runs], metrics)
    written.append(out_dir / "metrics_by_program_stage.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    curves = reward_histories(runs)
    if curves:
        figure = plots.reward_curves(curves)
        written.append(out_dir / "reward_curves.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def log_plots(runs: list[ComparedRun], metrics: list[str], out_dir: Path | None = None) -> tuple[str, list[Path]]:
    """Write the plots and log them to the ``compare`` run of these runs; returns its id and the files."""
    import mlflow

    key = hashlib.sha256(" ".join(sorted(r.run_id for r in runs) + metrics).encode()).hexdigest()[:16]
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="apexdsp-compare-"))
    files = write_plots(runs, metrics, out_dir)
    client = _client()
    experiment_id = runs[0].experiment_id
    existing = client.search_runs([experiment_id], filter_string=f"tags.`apexdsp.compare_key` = '{key}'",
                                  max_results=1)
    run_id = existing[0].info.run_id if existing else None
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=None if run_id else "compare") as run:
        if run_id is None:
            mlflow.set_tags({"apexdsp.kind": "compare", "apexdsp.compare_key": key})
            mlflow.log_params({"runs": len(runs), "metrics": ",".join(metrics)})
            mlflow.log_text("\n".join(r.run_id for r in runs) + "\n", "compared_runs.txt")
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="plots")
        return run.info.run_id, files
