"""``apexdsp compare``: evaluation runs side by side from MLflow, with plots logged as artifacts."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from apexdsp.cli.consoles import wide_console
from apexdsp.errors import ApexError
from apexdsp.lm import TIME_SHARES

# A pipe or a log file has no width: print the whole table there instead of rich's 80 columns, which cut the
# metric headers short ("compile_seco…").
console = wide_console()
METRICS = ("em", "f1", "hit", "recall", "decomposition", "plan_fallback_rate", "compile_seconds", "lm_calls", "tokens",
           "seconds_per_question", *TIME_SHARES)


def register(app: typer.Typer) -> None:
    """Add ``compare`` to the root command."""
    app.command("compare")(compare)


def _metrics(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METRICS]
    if not names or unknown:
        raise ApexError(f"--metric takes a comma-separated list of {', '.join(METRICS)}; got {text!r}")
    return names


def compare(
    run_ids: Annotated[Optional[list[str]], typer.Argument(help="Run ids (a parent run stands for its evaluations).")] = None,
    experiment: Annotated[Optional[str], typer.Option(help="MLflow experiment whose evaluation runs to compare.")] = None,
    metric: Annotated[str, typer.Option(help="Metrics, comma-separated.")] = "em,f1",
    plots: Annotated[bool, typer.Option(help="Write PNG plots and log them to MLflow.")] = True,
    paired: Annotated[bool, typer.Option(help=(
        "Also compare each compiled run with its program's uncompiled run question by question (difference, "
        "95% bootstrap interval, wins and losses)."))] = True,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the PNGs (default: a temporary folder).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
) -> None:
    """Compare runs: program, stage, the params that differ, and metrics."""
    from apexdsp.experiments.compare import comparison, find_runs, log_plots

    metrics = _metrics(metric)
    runs = find_runs(experiment, run_ids or [])
    result = comparison(runs, metrics)
    if paired:
        from apexdsp.experiments.compare import paired_rows

        result["paired"] = paired_rows(runs)
    if plots:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links; --json stays clean
            result["compare_run_id"], files = log_plots(runs, metrics, out)
        result["plots"] = [str(path) for path in files]
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{len(runs)} runs" + (f" of {experiment}" if experiment else ""))
    for column in ("program", "stage", *result["differing_params"]):
        table.add_column(column, overflow="fold", max_width=40)
    for name in metrics:
        table.add_column(name, justify="right", min_width=len(name))
    for row in result["runs"]:
        figures = [f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row["metrics"].values()]
        table.add_row(row["program"], row["stage"], *[str(v or "") for v in row["params"].values()], *figures)
    console.print(table)
    if result.get("paired"):
        _print_paired(result["paired"])
    if plots:
        console.print(f"plots: {', '.join(result['plots'])} (logged to MLflow run {result['compare_run_id']})")


def _print_paired(rows: list[dict]) -> None:
    table = Table(title="against the uncompiled run, question by question: difference [95% interval] wins/losses")
    for column in ("program", "stage", *PAIRED_COLUMNS):
        table.add_column(column, overflow="fold")
    for row in rows:
        cells = []
        for metric in PAIRED_COLUMNS:
            d = row["paired"].get(metric)
            cells.append("" if d is None else f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] "
                                              f"{d['wins']}/{d['losses']}")
        table.add_row(row["program"], row["stage"], *cells)
    console.print(table)


PAIRED_COLUMNS = ("em", "f1", "hit", "recall")
