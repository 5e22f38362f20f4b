"""A step's seconds count every attempt (a killed one up to its last tick) and leave out pauses (SIGSTOP)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

from apexdsp.experiments.step_clock import CLOCK_FILE, StepClock


def _attempt(work_dir, seconds: float) -> subprocess.Popen:
    """An attempt at a step in its own process: ``seconds`` of work in 10 ms pieces under the step's clock
    (a stopped process does no piece, so the work takes longer by the pause)."""
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from apexdsp.experiments.step_clock import StepClock
        with StepClock(Path({str(work_dir)!r}), interval=0.1, max_gap=0.5):
            for _ in range(int({seconds} * 100)):
                time.sleep(0.01)
    """)
    return subprocess.Popen([sys.executable, "-c", script])


def _wait_for_clock(work_dir) -> None:
    deadline = time.time() + 60
    while not (work_dir / CLOCK_FILE).is_file() and time.time() < deadline:
        time.sleep(0.05)


def test_a_killed_attempt_keeps_its_seconds_and_the_next_attempt_adds_to_them(tmp_path):
    killed = _attempt(tmp_path, 60)
    _wait_for_clock(tmp_path)
    time.sleep(2.0)
    killed.kill()
    killed.wait()
    kept = json.loads((tmp_path / CLOCK_FILE).read_text())
    assert kept["attempts"] == 1 and 1.5 <= kept["seconds"] <= 2.5

    with StepClock(tmp_path, interval=0.1) as clock:
        time.sleep(1.0)
    assert clock.attempts == 2
    assert kept["seconds"] + 0.9 <= clock.total <= kept["seconds"] + 1.5
    assert json.loads((tmp_path / CLOCK_FILE).read_text())["seconds"] == clock.total


def test_a_paused_attempt_does_not_count_its_pause(tmp_path):
    attempt = _attempt(tmp_path, 2.0)
    _wait_for_clock(tmp_path)
    time.sleep(0.5)
    attempt.send_signal(signal.SIGSTOP)
    time.sleep(4.0)
    attempt.send_signal(signal.SIGCONT)
    assert attempt.wait(timeout=60) == 0
    state = json.loads((tmp_path / CLOCK_FILE).read_text())
    # ran ~6 s of wall-clock, worked ~2 s (the pause counts one tick)
    assert 1.9 <= state["seconds"] <= 3.5 and state["paused_seconds"] >= 3.0
