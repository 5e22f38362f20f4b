"""``apexdsp run SPEC.toml``: do every step that is not done yet, and log the experiment to MLflow.

Computing and logging are separate on purpose. A step's result is written to its cache folder before
anything is sent to MLflow, and a ledger (``<cache>/ledger/<spec>.json``) remembers which step was
logged as which child run of which parent run, per tracking store. So:

* re-running a finished experiment computes nothing and logs nothing;
* a failed step is resumed by running again (finished steps are reused; the parent run is reopened);
* a killed step is resumed in the child run it was logging to: the ledger records a run the moment it is
  opened, every run opened under the ledger carries its id (tag ``apexdsp.ledger``), and a rerun first
  ends as KILLED whatever such runs (and the stage runs below them) a killed process left RUNNING;
* with MLflow down, ``--no-track`` computes anyway, and ``--log-only`` later logs what was computed,
  without recomputing it;
* a lock file keeps two processes from running the same experiment at once, and a lock per step makes an
  experiment wait while another computes a step they share (the encoder and index of a data set);
* a step's ``seconds`` (and a compile's ``compile_seconds``) are its active time over every attempt,
  pauses left out (:class:`~apexdsp.experiments.step_clock.StepClock`);
* a compile step's program is also logged as an MLflow model, registered as ``apexdsp-<program>``
  (:mod:`~apexdsp.experiments.step_logging`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from apexdsp.errors import ApexError
from apexdsp.experiments.spec import ExperimentSpec
from apexdsp.experiments.step_clock import StepClock
from apexdsp.experiments.step_logging import metric_name
from apexdsp.experiments.steps import RESULT_FILE, RunContext, Step, plan_steps
from apexdsp.locks import held_lock
from apexdsp.tracking.run import write_json_atomic
from apexdsp.tracking.store import TrackingUnavailable, probe_tracking


@dataclass
class StepReport:
    label: str
    kind: str
    key: str
    status: str  # computed | cached | skipped (log-only, not computed yet)
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


@dataclass
class RunSummary:
    spec: str
    parent_run_id: str | None
    steps: list[StepReport]

    @property
    def computed(self) -> list[StepReport]:
        return [step for step in self.steps if step.status == "computed"]


def default_cache_root() -> Path:
    from apexdsp.paths import cache_dir

    return cache_dir("experiments")


def experiment_lock(cache_root: Path, name: str) -> contextlib.AbstractContextManager[Path]:
    """Hold ``<cache>/locks/<name>.lock``; a second run of the same experiment fails at once."""
    path = cache_root / "locks" / f"{name}.lock"

    def refuse(holder: str) -> None:
        raise ApexError(f"experiment {name!r} is already running ({holder}; lock file {path}); "
                        "wait for it to finish")

    return held_lock(path, refuse)


def step_lock(cache_root: Path, key: str, on_wait: Callable[[str], None]) -> contextlib.AbstractContextManager[Path]:
    """Hold ``<cache>/locks/step-<key>.lock`` while a step is computed, waiting if another process holds it.

    Experiments share steps (the four specs of a data set train one encoder and build one index); two of
    them started together would otherwise both compute the shared step into the same folder.
    """
    return held_lock(cache_root / "locks" / f"step-{key}.lock", on_wait)


class Ledger:
    """Which step was logged as which MLflow run, per tracking store and experiment plan (JSON, atomic).

    ``children`` maps a step to its finished child run, ``open`` a step to the child run it is logging to
    while it is computed (what a rerun after a kill resumes); ``id`` tags every run opened under the ledger.
    """

    def __init__(self, path: Path, tracking_uri: str, plan_key: str):
        self.path = path
        self.slot = f"{tracking_uri} {plan_key}"
        self._data = json.loads(path.read_text()) if path.is_file() else {}
        self.entry = self._data.setdefault(self.slot, {"parent": None, "children": {}})
        self.entry.setdefault("open", {})
        if "id" not in self.entry:  # saved before any run carries it, so a rerun finds what a kill left
            self.entry["id"] = uuid.uuid4().hex
            self.save()

    @property
    def tag(self) -> dict[str, str]:
        return {"apexdsp.ledger": self.entry["id"]}

    def save(self) -> None:
        write_json_atomic(self._data, self.path)


def end_interrupted_runs(ledger: Ledger) -> list[str]:
    """End as KILLED every run of ``ledger`` still RUNNING, and the RUNNING runs nested below them; returns
    their ids. Called under the experiment lock before any run is opened: each was left by a killed process."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from apexdsp.tracking.store import configure_tracking

    client = MlflowClient(configure_tracking())
    experiments = [e.experiment_id for e in mlflow.search_experiments()]  # every page: a nested run may be anywhere

    def running(where: str) -> list[str]:
        found = mlflow.search_runs(experiments, f"{where} and attributes.status = 'RUNNING'", output_format="list")
        return [run.info.run_id for run in found]

    found = running(f"tags.`apexdsp.ledger` = '{ledger.entry['id']}'") if experiments else []
    ended: list[str] = []
    while found:
        run_id = found.pop()
        if run_id in ended:  # a child of the ledger's parent run carries the ledger's tag too
            continue
        client.set_terminated(run_id, status="KILLED")
        ended.append(run_id)
        found += running(f"tags.`mlflow.parentRunId` = '{run_id}'")
    return ended


class ExperimentRunner:
    """Plans the steps of a spec, runs those not done, and logs them as children of one parent run."""

    def __init__(self, spec: ExperimentSpec, spec_path: Path | None = None, cache_root: Path | None = None,
                 console: Console | None = None):
        self.spec = spec
        self.spec_path = spec_path
        self.cache_root = Path(cache_root) if cache_root else default_cache_root()
        self.console = console or Console(stderr=True)
        self.steps: list[Step] = plan_steps(spec)
        self.context = RunContext(spec, self.cache_root)
        for step in self.steps:
            if step.kind == "index":
                self.context.index_dir = self.context.step_dir(step) / "index"

    def plan_key(self) -> str:
        import hashlib

        return hashlib.sha256(" ".join(step.key for step in self.steps).encode()).hexdigest()[:16]

    def is_done(self, step: Step) -> bool:
        return (self.context.step_dir(step) / RESULT_FILE).is_file()

    def state(self, step: Step) -> str:
        """``done``, ``to do``, or how far an interrupted step got (what a rerun resumes from)."""
        work_dir = self.context.step_dir(step)
        if self.is_done(step):
            return "done"
        if not work_dir.is_dir():
            return "to do"
        clock = StepClock.read(work_dir)
        parts = [step.progress(work_dir)]
        if clock:
            parts.append(f"{clock['seconds'] / 60:.0f} min of work in {clock['attempts']} attempt"
                         + ("s" if clock["attempts"] > 1 else ""))
        return "in progress: " + (", ".join(part for part in parts if part) or "started")

    def run(self, track: bool = True, log_only: bool = False) -> RunSummary:
        """Compute missing steps (unless ``log_only``) and log unlogged ones (when ``track``)."""
        if log_only and not track:
            raise ApexError("--log-only and --no-track contradict each other")
        track = track and self.spec.track
        with experiment_lock(self.cache_root, self.spec.name):
            if not track:
                from apexdsp.tracking import tracking_disabled

                with tracking_disabled():  # the stages' own runs too: nothing reaches MLflow
                    return RunSummary(self.spec.name, None, [self._execute(step, None) for step in self.steps])
            from apexdsp.tracking import default_tracking_uri

            uri = default_tracking_uri()
            probe_tracking(uri, "nothing was computed. Start it, or run with --no-track now and log later "
                                "with --log-only")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
            ledger = Ledger(self.cache_root / "ledger" / f"{self.spec.name}.json", uri, self.plan_key())
            return self._run_tracked(ledger, log_only)

    def _run_tracked(self, ledger: Ledger, log_only: bool) -> RunSummary:
        children = ledger.entry["children"]
        ended = end_interrupted_runs(ledger)
        for run_id in ended:
            self.console.print(f"[dim]MLflow run {run_id} was left running by a killed process: ended as KILLED[/]")
        pending = [s for s in self.steps if s.key not in children and (self.is_done(s) or not log_only)]
        if not pending and ledger.entry["parent"] not in ended:  # all computed and logged: no run is opened
            reports = [self._report(step, "cached", children.get(step.key)) for step in self.steps]
            for report in reports:
                self.console.print(f"[dim]{report.label} ({report.kind}): done, logged as {report.run_id}[/]")
            return RunSummary(self.spec.name, ledger.entry["parent"], reports)
        reports = []
        try:
            with self._parent_run(ledger) as parent_id:
                for step in self.steps:
                    if step.key in children:
                        reports.append(self._report(step, "cached", children[step.key]))
                    elif log_only and not self.is_done(step):
                        self.console.print(f"[yellow]{step.label} ({step.kind}): not computed yet, not logged[/]")
                        reports.append(StepReport(step.label, step.kind, step.key, "skipped"))
                    else:
                        report = self._tracked_step(step, ledger)
                        children[step.key] = report.run_id
                        ledger.entry["open"].pop(step.key, None)
                        ledger.save()
                        reports.append(report)
                self._log_parent_summary(reports)
        except ApexError:  # TrackingUnavailable included
            raise
        except Exception as error:
            if _is_tracking_error(error):
                raise TrackingUnavailable(
                    f"MLflow stopped answering ({type(error).__name__}: {str(error)[:200]}); every step computed "
                    f"so far is kept in {self.cache_root}: run again, or with --log-only, once it is back") from None
            raise
        return RunSummary(self.spec.name, parent_id, reports)

    @contextlib.contextmanager
    def _parent_run(self, ledger: Ledger) -> Iterator[str]:
        import mlflow

        from apexdsp.tracking import ensure_experiment, tracked_run

        experiment_id = ensure_experiment(self.spec.mlflow_experiment)
        parent = ledger.entry["parent"]
        if parent is not None:
            with mlflow.start_run(run_id=parent, experiment_id=experiment_id):
                yield parent
            return
        tags = {"apexdsp.kind": "experiment", "apexdsp.spec": self.spec.name, "apexdsp.plan": self.plan_key()}
        with tracked_run(self.spec.mlflow_experiment, run_name=self.spec.name, params=self._spec_params(),
                         tags={**tags, **ledger.tag}) as run:
            ledger.entry["parent"] = run.run_id
            ledger.save()
            run.log_json(self.spec.model_dump(mode="json"), "spec.json")
            if self.spec_path is not None:
                mlflow.log_artifact(str(self.spec_path))
            yield run.run_id

    def _spec_params(self) -> dict[str, Any]:
        spec = self.spec
        params: dict[str, Any] = {"spec": spec.name, "spec_sha256": spec.sha256()[:16], "program": spec.program.name,
                                  "lm": spec.lm.default, "test": spec.data.test.describe(),
                                  "stages": "+".join(stage.label for stage in spec.optimizer.stages) or "none",
                                  "index": spec.index.kind if spec.index else "none", "seed": spec.seed}
        if spec.index is not None and spec.index.kind == "colbert":
            params["retriever"] = spec.index.retriever
        if spec.data.train is not None:
            params["train"] = spec.data.train.describe()
        return params

    def _tracked_step(self, step: Step, ledger: Ledger) -> StepReport:
        import mlflow

        with self._child_run(step, ledger) as run_id:
            report = self._execute(step, run_id)
            self._log_result(step)
            mlflow.set_tag("apexdsp.reused", str(report.status == "cached").lower())
        return report

    @contextlib.contextmanager
    def _child_run(self, step: Step, ledger: Ledger) -> Iterator[str]:
        """The step's child run: the one a killed attempt left open (resumed), else a new one, recorded in
        the ledger as soon as it exists. A step that fails ends its run FAILED; a rerun opens a new one."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from apexdsp.tracking import ensure_experiment

        experiment_id = ensure_experiment(self.spec.mlflow_experiment)
        opened = ledger.entry["open"]
        run = None
        if step.key in opened:
            try:
                run = mlflow.start_run(run_id=opened[step.key], nested=True)
                self.console.print(f"[dim]{step.label} ({step.kind}): resuming MLflow run {run.info.run_id}[/]")
            except MlflowException:  # deleted, or gone from the store: a new run takes its place
                pass
        resumed = run is not None
        if not resumed:
            tags = {"apexdsp.kind": "step", "apexdsp.step": step.kind, "apexdsp.label": step.label,
                    "apexdsp.step_key": step.key, "apexdsp.spec": self.spec.name, **ledger.tag}
            run = mlflow.start_run(experiment_id=experiment_id, run_name=f"{self.spec.name}/{step.kind}:{step.label}",
                                   nested=True, tags=tags)
        with run:
            if not resumed:
                opened[step.key] = run.info.run_id
                ledger.save()
            try:
                yield run.info.run_id
            except BaseException:
                opened.pop(step.key, None)
                ledger.save()
                raise

    def _execute(self, step: Step, run_id: str | None) -> StepReport:
        """The step's result: from its cache folder if done, else computed now and written there."""
        work_dir = self.context.step_dir(step)
        if not self.is_done(step):
            def waiting(holder: str) -> None:
                self.console.print(f"[yellow]{step.label} ({step.kind}): another experiment is computing this "
                                   f"step ({holder}); waiting for it[/]")

            with step_lock(self.cache_root, step.key, waiting):
                if not self.is_done(step):  # the other process may have finished it meanwhile
                    return self._compute(step, work_dir, run_id)
        self.console.print(f"[dim]{step.label} ({step.kind}): reusing {work_dir.name}[/]")
        return self._report(step, "cached", run_id)

    def _compute(self, step: Step, work_dir: Path, run_id: str | None) -> StepReport:
        self.console.print(f"[bold]{step.label} ({step.kind})[/]: computing into {work_dir}")
        work_dir.mkdir(parents=True, exist_ok=True)
        with StepClock(work_dir) as clock:  # active seconds over every attempt, kept in the step's folder
            output = step.run(self.context, work_dir)
        seconds = clock.total
        metrics = step.with_active_seconds(output.metrics, seconds)
        result = {"kind": step.kind, "label": step.label, "key": step.key, "spec": self.spec.name,
                  "seconds": seconds, "attempts": clock.attempts, "paused_seconds": clock.paused,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "params": output.params, "metrics": metrics, "artifacts": output.artifacts,
                  "history": output.history, "load_average": list(os.getloadavg())}
        write_json_atomic(result, work_dir / RESULT_FILE)  # last: its presence means the step is done
        self.console.print(f"{step.label} ({step.kind}): done in {seconds:.0f}s"
                           + (f" over {clock.attempts} attempts" if clock.attempts > 1 else ""))
        return self._report(step, "computed", run_id)

    def _report(self, step: Step, status: str, run_id: str | None) -> StepReport:
        result = self.result(step)
        return StepReport(step.label, step.kind, step.key, status, (result or {}).get("seconds", 0.0),
                          (result or {}).get("metrics", {}), run_id)

    def result(self, step: Step) -> dict[str, Any] | None:
        path = self.context.step_dir(step) / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def _log_result(self, step: Step) -> None:
        """Params, figures, curves and artifacts of a finished step, into the active child run, and a compile
        step's program as an MLflow model."""
        from apexdsp.experiments.step_logging import log_step_result

        log_step_result(step.kind, step.label, step.key, self.result(step), self.context.step_dir(step), self.console)

    def _log_parent_summary(self, reports: list[StepReport]) -> None:
        """Each evaluation's figures on the parent too (``em/bootstrap``), for comparing experiments."""
        import mlflow

        from apexdsp.tracking.run import TrackedRun

        figures = {}
        for report in reports:
            if report.kind == "evaluate":
                for metric in self.spec.evaluation.metrics:
                    if report.metrics.get(metric) is not None:
                        figures[metric_name(f"{metric}/{report.label}")] = report.metrics[metric]
        TrackedRun(mlflow.active_run()).log_metrics(figures)


def _is_tracking_error(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        import requests

        network = (requests.RequestException, ConnectionError)
    except ImportError:  # pragma: no cover
        network = (ConnectionError,)
    return isinstance(error, (MlflowException, *network))
