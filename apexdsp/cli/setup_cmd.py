"""``apexdsp setup warm``: do once, at set-up, the slow first-time work (model conversion, C++ builds)."""

from __future__ import annotations

import time

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="One-time set-up steps (run by scripts/setup.sh).")
console = Console()


@app.command()
def warm() -> None:
    """Convert the default LM to safetensors and compile colbert-ai's C++ extensions (idempotent)."""
    from apexdsp.indexes.extensions import build_extensions
    from apexdsp.lm.gguf_models import ensure_converted

    started = time.perf_counter()
    path = ensure_converted("smollm2-135m")
    console.print(f"model ready: {path} ({time.perf_counter() - started:.1f}s)")
    started = time.perf_counter()
    build_extensions()
    console.print(f"colbert extensions ready ({time.perf_counter() - started:.1f}s)")
