"""``apexdsp quickstart`` and ``apexdsp ui``: the first run, and the MLflow UI over the project's store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console()


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)
    app.command("ui")(ui)


def quickstart(
    folder: Annotated[Optional[Path], typer.Option(help="Where to write the experiment (default .apexdsp/quickstart).")] = None,
    test: Annotated[int, typer.Option(min=1, help="HotpotQA dev questions to evaluate on.")] = 24,
    grpo_steps: Annotated[int, typer.Option(min=1, help="GRPO steps on the planner.")] = 2,
) -> None:
    """Write and run a small real experiment (encoder, index, apex uncompiled / bootstrap / +GRPO), then
    compare its runs. Re-running it reuses every finished step."""
    from apexdsp.cli.compare_cmd import compare
    from apexdsp.cli.run_cmd import run
    from apexdsp.experiments.quickstart import QuickstartSize, write_quickstart
    from apexdsp.paths import cache_dir, shared_data_dir
    from apexdsp.tracking import default_tracking_uri

    spec = write_quickstart(folder or cache_dir("quickstart"), shared_data_dir(),
                            QuickstartSize(test=test, grpo_steps=grpo_steps))
    console.rule(f"quickstart: {spec}")
    run(spec=[spec], track=True, log_only=False, check=False, cache_dir=None, as_json=False)
    console.rule("comparison")
    compare(run_ids=None, experiment="quickstart", metric="em,f1,hit,decomposition", plots=True, out=None, as_json=False)
    console.print(f"\nRuns are in the MLflow store {default_tracking_uri()}.\nOpen the UI with: "
                  "[bold].venv/bin/apexdsp ui[/] (then http://127.0.0.1:5000, experiment 'quickstart')")


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
