"""``apexdsp quickstart`` and ``apexdsp ui``: the first run, and the MLflow UI over the project's store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)
    app.command("ui")(ui)


def quickstart(
    limit: Annotated[int, typer.Option(min=1, help="HotpotQA dev questions to answer.")] = 20,
    lm: Annotated[str, typer.Option(help="LM name.")] = "smollm2-135m",
) -> None:
    """Answer HotpotQA dev questions closed-book with the local LM and log the run to MLflow."""
    from apexdsp.cli.eval_cmd import evaluate
    from apexdsp.paths import shared_data_dir
    from apexdsp.tracking import default_tracking_uri

    questions = shared_data_dir() / "hotpotqa" / "dev.jsonl"
    console.rule(f"quickstart: vanilla {lm} on {limit} HotpotQA dev questions")
    evaluate(program="vanilla", questions=questions, index=None, lm=lm, limit=limit, threads=8, cache=False,
             track=True, as_json=False)
    console.print(f"\nRuns are in the MLflow store {default_tracking_uri()}.\nOpen the UI with: "
                  "[bold].venv/bin/apexdsp ui[/] (then http://127.0.0.1:5000)")


def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on the project's store, bound to loopback."""
    from apexdsp.tracking import default_tracking_uri
    from apexdsp.tracking.store import artifact_root

    uri = default_tracking_uri()
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port)]
    if uri.startswith("sqlite:"):
        command += ["--default-artifact-root", Path(artifact_root(uri)).as_uri()]
    console.print(f"MLflow UI on http://127.0.0.1:{port} (store {uri}); Ctrl-C stops it")
    raise typer.Exit(subprocess.call(command))
