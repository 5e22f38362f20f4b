"""``apexdsp run SPEC.toml [SPEC.toml ...]``: run experiment specs (every step not done yet), logged to MLflow.

Several specs run one after the other, all checked first, so a typo in the last one is reported before
hours of work on the first; steps they share (a data set's encoder and index) are computed once.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from apexdsp.cli.consoles import wide_console

if TYPE_CHECKING:
    from apexdsp.experiments.runner import ExperimentRunner

console = wide_console()


def register(app: typer.Typer) -> None:
    """Add ``run`` to the root command."""
    app.command("run")(run)


def run(
    spec: Annotated[list[Path], typer.Argument(help="Experiment specs (TOML), e.g. experiments/specs/hotpotqa-*.toml.")],
    track: Annotated[bool, typer.Option(help="Log to MLflow (--no-track: compute only; log later with --log-only).")] = True,
    log_only: Annotated[bool, typer.Option("--log-only", help="Compute nothing; log the steps already computed.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only check the spec and print the planned steps, and how far each got.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Step cache (default .apexdsp/experiments).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run experiments: encoder, index, compile stages, evaluations; each step cached by content hash."""
    from apexdsp.experiments.runner import ExperimentRunner
    from apexdsp.experiments.spec import load_spec

    runners = [ExperimentRunner(load_spec(path), path, cache_root=cache_dir, console=wide_console(stderr=True))
               for path in spec]  # all checked first
    for runner in runners:
        if check:
            _print_plan(runner, header=len(runners) > 1)
        else:
            _run_one(runner, track=track, log_only=log_only, as_json=as_json)


def _print_plan(runner: ExperimentRunner, header: bool) -> None:
    if header:
        console.print(f"[bold]{runner.spec.name}[/]")
    for step in runner.steps:
        console.print(f"{step.kind:9} {step.label:30} {step.key}  {runner.state(step)}", soft_wrap=True)


def _run_one(runner: ExperimentRunner, *, track: bool, log_only: bool, as_json: bool) -> None:
    experiment = runner.spec
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; --json output stays one line
        summary = runner.run(track=track, log_only=log_only)
    if as_json:  # one line per spec
        print(json.dumps({"spec": summary.spec, "parent_run_id": summary.parent_run_id,
                          "steps": [vars(step) for step in summary.steps]}, default=str))
        return
    table = Table(title=f"{summary.spec}" + (f"  (MLflow parent run {summary.parent_run_id})"
                                             if summary.parent_run_id else ""))
    for column in ("step", "label", "status", "seconds", *experiment.evaluation.metrics):
        table.add_column(column, justify="right" if column not in ("step", "label", "status") else "left")
    for step in summary.steps:
        figures = [f"{step.metrics[m]:.3f}" if step.kind == "evaluate" and step.metrics.get(m) is not None else ""
                   for m in experiment.evaluation.metrics]
        table.add_row(step.kind, step.label, step.status, f"{step.seconds:.0f}", *figures)
    console.print(table)
    if summary.parent_run_id:
        console.print(f"compare: apexdsp compare --experiment {experiment.mlflow_experiment}    UI: apexdsp ui")
