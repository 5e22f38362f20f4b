"""What a run was made from: code version, data file hashes, library versions.

These become MLflow params/tags so that two runs can be compared on what actually differed.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from apexdsp.data.loaders import file_sha256
from apexdsp.paths import recorded_path, repo_root

TRACKED_PACKAGES = ("apexdsp", "dspy", "torch", "transformers", "trl", "colbert-ai", "mlflow")


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit, suffixed ``-dirty`` when there are uncommitted changes; ``unknown`` outside git."""
    try:
        root = repo_root()
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes results."""
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def data_file_params(paths: dict[str, str | Path]) -> dict[str, str]:
    """``{role: path}`` → params ``{role: path, role_sha256: first 16 hex digits}`` (paths as :func:`recorded_path`)."""
    params: dict[str, str] = {}
    for role, path in paths.items():
        params[role] = recorded_path(path)
        params[f"{role}_sha256"] = file_sha256(path)[:16]
    return params
