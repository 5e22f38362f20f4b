"""What every kill-and-rerun test module shares: a command's environment, an uninterrupted run to compare
with, one kill added to the session's table (:data:`kill_harness.TABLE`), and the assertions on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kill_harness import TABLE, Finished, Killed, Outcome, command_env, error_line, leftover_temps


@dataclass
class Baseline:
    """An uninterrupted run: what a rerun must equal, and how long it took (the range of random kills)."""

    value: dict
    seconds: float


def env_for(folder: Path, **extra: str) -> dict[str, str]:
    """A command's environment: its reports and its MLflow store in the test's ``folder``."""
    return command_env(APEXDSP_RUNS=str(folder / "runs"), MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
                       **extra)


def record(command: str, point: str, killed: Killed, rerun: Finished, equal: bool, lost: int, running: list[str],
           root: Path, notes: list[str], state: str = "") -> Outcome:
    """Add one kill to the table."""
    if rerun.returncode != 0:
        notes = notes + [f"rerun exited {rerun.returncode}: {error_line(rerun.stderr)[:300]}"]
    if not killed.killed:
        notes = notes + [f"exited {killed.returncode} before the kill point"]
    if killed.temps:
        state = "; ".join(filter(None, [state, f"the kill left {', '.join(killed.temps)}"]))
    where = f"{point} (at {killed.at_s:.1f}s" + (f"; {state})" if state else ")")
    return TABLE.add(Outcome(command, where, killed.killed, rerun.returncode == 0, equal, lost, len(running),
                             leftover_temps(root), notes + running, round(rerun.seconds, 1)))


def check(outcome: Outcome, drawn: bool = False) -> None:
    """Assert the kill happened and lost nothing: the rerun finished with what an uninterrupted run gives,
    left no temporary file and no MLflow run RUNNING. A point ``drawn`` past the command's end is skipped."""
    if drawn and not outcome.killed:
        pytest.skip(f"the command finished before the drawn point: {outcome}")
    assert outcome.killed, outcome
    assert outcome.rerun_finished, outcome
    assert outcome.files_lost == 0, outcome
    assert outcome.equal, outcome
    assert outcome.running_left == 0, outcome
    assert not outcome.temps_left, outcome
