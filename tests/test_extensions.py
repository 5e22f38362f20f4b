"""The colbert extension build lock: stale torch batons are cleared, and a killed holder frees the lock."""

import os
import signal
import subprocess
import sys
import threading

from apexdsp.indexes.extensions import BATON, extension_build_lock


def test_batons_left_by_a_killed_build_are_removed_under_the_lock(tmp_path):
    for name in ("segmented_lookup_cpp", "filter_pids_cpp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / BATON).touch()
    (tmp_path / "segmented_maxsim_cpp").mkdir()
    (tmp_path / "segmented_maxsim_cpp" / "segmented_maxsim_cpp.so").touch()

    with extension_build_lock(tmp_path) as stale:
        assert sorted(p.parent.name for p in stale) == ["filter_pids_cpp", "segmented_lookup_cpp"]
        assert not list(tmp_path.glob(f"*/{BATON}"))
    assert (tmp_path / "segmented_maxsim_cpp" / "segmented_maxsim_cpp.so").exists()


def test_a_holder_killed_mid_build_does_not_block_the_next_process(tmp_path):
    (tmp_path / "ext").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from apexdsp.indexes.extensions import extension_build_lock\n"
         f"with extension_build_lock({str(tmp_path)!r}):\n"
         f"    open({str(tmp_path / 'ext' / BATON)!r}, 'w').close(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        acquired = threading.Event()

        def take() -> None:
            with extension_build_lock(tmp_path):
                acquired.set()

        waiter = threading.Thread(target=take, daemon=True)
        waiter.start()
        assert not acquired.wait(1.0), "the lock was taken while its holder was alive"
        os.kill(holder.pid, signal.SIGKILL)  # as a killed experiment: no cleanup runs
        assert acquired.wait(30), "the lock stayed held after its holder died"
        assert not (tmp_path / "ext" / BATON).exists()  # the torch baton it left is gone too
    finally:
        holder.kill()
        holder.wait()


def test_extensions_are_built_with_the_environments_own_ninja(monkeypatch):
    """The system's ninja first on PATH (a shell without the environment activated) gives way to the
    environment's while torch builds: one ninja for every process, so none takes another's build for stale."""
    import shutil
    from pathlib import Path

    from apexdsp.indexes.extensions import project_ninja

    own = Path(sys.executable).parent / "ninja"
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin", os.environ.get("PATH", "")]))
    before = os.environ["PATH"]
    with project_ninja():
        assert shutil.which("ninja") == str(own)
    assert os.environ["PATH"] == before
