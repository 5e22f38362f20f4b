"""How long a step computed, over every attempt: the figure a killed-and-resumed step would otherwise lose.

A step on two CPU cores runs for hours and is resumed across sessions (its evaluation per question, a
GRPO stage from its checkpoints, a bootstrap from its checkpoint). The wall-clock time of the attempt
that finished says little about what the step cost: it misses the attempts that were killed and counts
the hours a process was paused (``SIGSTOP``) to free the cores.

:class:`StepClock` keeps the step's **active seconds** in ``clock.json`` in the step's folder. A background
thread ticks every ``interval`` seconds and adds the time since its last tick, written atomically, so a
killed attempt keeps all but its last ``interval`` seconds. A gap between ticks longer than
``max_gap`` means the process was stopped (or the machine slept): it counts as one ``interval``, not as
the pause.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from apexdsp.tracking.run import write_json_atomic

CLOCK_FILE = "clock.json"


class StepClock:
    """Active seconds of one step over its attempts (``with StepClock(work_dir) as clock: ...``; ``clock.total``)."""

    def __init__(self, work_dir: Path, interval: float = 15.0, max_gap: float | None = None):
        self.path = Path(work_dir) / CLOCK_FILE
        self.interval = interval
        self.max_gap = max_gap if max_gap is not None else 4 * interval
        earlier = self.read(work_dir)
        self.earlier = float(earlier.get("seconds", 0.0))  # attempts before this one
        self.attempts = int(earlier.get("attempts", 0)) + 1
        self.paused = float(earlier.get("paused_seconds", 0.0))
        self._active = 0.0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="step-clock", daemon=True)

    @property
    def total(self) -> float:
        """Active seconds of every attempt so far, this one up to now (up to its end, once it ended)."""
        if not self._stop.is_set():
            self._tick()
        return self.earlier + self._active

    def __enter__(self) -> StepClock:
        self._save()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._tick()
        self._save()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()
            self._save()

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            gap = now - self._last
            if gap > self.max_gap:  # stopped, not computing: count one interval of it
                self.paused += gap - self.interval
                gap = self.interval
            self._active += gap
            self._last = now

    def _save(self) -> None:
        with self._lock:
            state = {"seconds": self.earlier + self._active, "attempts": self.attempts,
                     "paused_seconds": self.paused}
        write_json_atomic(state, self.path)

    @staticmethod
    def read(work_dir: Path) -> dict[str, Any]:
        """What the step's earlier attempts counted (``seconds``, ``attempts``, ``paused_seconds``); {} if none."""
        try:
            return json.loads((Path(work_dir) / CLOCK_FILE).read_text())
        except (OSError, ValueError):
            return {}


__all__ = ["CLOCK_FILE", "StepClock"]
