"""One inter-process lock for everything apexdsp must not do twice at once.

Experiments, shared experiment steps and colbert's extension builds each take an ``flock`` on a file.
The kernel releases an ``flock`` when its holder dies, however it dies, so a killed run never leaves a
lock behind that the next run would wait on forever (torch's own build baton does exactly that). The
holder writes its pid and start time into the file, so whoever finds it busy can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def held_lock(path: str | os.PathLike[str], on_busy: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder), waiting while another process
    holds it. When it is busy, ``on_busy(holder)`` runs first with the holder's note: raise in it to give
    up instead of waiting, or use it to say why the caller is waiting."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            if on_busy is not None:
                on_busy(handle.read().strip() or "another process")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}")
        handle.flush()
        yield path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts as alive; a pid this host
    cannot check, 0 or below, counts as alive so that what it left is left alone)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
