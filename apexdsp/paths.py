"""Where apexdsp keeps what it builds: converted models, compiled extensions, indexes, the MLflow store.

Everything lives under one project-local directory, ``.apexdsp`` in the current working directory, so a
clone is self-contained and ``rm -rf .apexdsp`` resets it. ``APEXDSP_HOME`` moves it.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The root of apexdsp's caches and stores (created on first use)."""
    root = Path(os.environ.get("APEXDSP_HOME", Path.cwd() / ".apexdsp")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_dir(*parts: str) -> Path:
    """A sub-directory of :func:`home`, created on first use (e.g. ``cache_dir("models")``)."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Where ``apexdsp evaluate`` writes its reports: ``APEXDSP_RUNS`` if set (the tests point it at a
    temporary folder, so they never mix their runs with a user's), else ``.apexdsp/runs``."""
    override = os.environ.get("APEXDSP_RUNS")
    if not override:
        return cache_dir("runs")
    path = Path(override).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def configure_environment() -> None:
    """Environment defaults that must be set before torch, transformers, litellm or colbert import.

    The Hugging Face hub is unreachable on the embedded default, litellm would fetch a cost map from the
    network, and colbert-ai JIT-compiles C++ extensions into ``TORCH_EXTENSIONS_DIR``: keeping those in
    the project cache means they are built once by ``apexdsp setup warm`` and reused.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Idle OpenMP threads spin by default; on a 2-core machine shared with other work that spinning steals
    # the cores from the threads doing the work (measured: 154 s -> 45 s for the LM tests under load).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir("torch_extensions")))
    os.environ.setdefault("DSPY_CACHEDIR", str(cache_dir("dspy_cache")))


def repo_root() -> Path:
    """The source checkout (the folder holding ``pyproject.toml``)."""
    return Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """The offline copy of the benchmarks: ``APEXDSP_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("APEXDSP_DATA")
    return Path(env).resolve() if env else (repo_root().parent / "shared" / "data").resolve()


def recorded_path(path: str | Path) -> str:
    """A file as runs record it (MLflow params, spec descriptions): relative to the data folder when it is
    one of its files (``hotpotqa/dev.jsonl``), else relative to the working directory when under it, else
    absolute. Runs made on two machines or from two checkouts then name the same data file the same way,
    so ``apexdsp compare`` does not show a machine's folders as a parameter that differs."""
    resolved = Path(path).expanduser().resolve()
    for base in (shared_data_dir(), Path.cwd().resolve()):
        if resolved.is_relative_to(base):
            return resolved.relative_to(base).as_posix()
    return str(resolved)
