"""The shared inter-process lock: a busy lock names its holder, and a second taker waits its turn."""

import os
import subprocess
import sys

import pytest

from apexdsp.locks import held_lock


def test_a_busy_lock_names_its_holder_to_the_next_taker(tmp_path):
    path = tmp_path / "locks" / "job.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from apexdsp.locks import held_lock\n"
         f"with held_lock({str(path)!r}):\n"
         "    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        seen: list[str] = []

        def refuse(note: str) -> None:
            seen.append(note)
            raise RuntimeError("busy")

        with pytest.raises(RuntimeError, match="busy"):
            with held_lock(path, refuse):
                pass
        assert seen and seen[0].startswith(f"pid {holder.pid} since ")
    finally:
        holder.kill()
        holder.wait()
    with held_lock(path) as taken:  # free again once the holder is gone, and the note is now ours
        assert taken.read_text().startswith("pid ")
        assert taken.read_text().split()[1] == str(os.getpid())
