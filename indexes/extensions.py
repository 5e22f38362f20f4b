"""Compile colbert-ai's C++ extensions once, at set-up, instead of inside the first query.

colbert-ai JIT-compiles four small C++ extensions with ninja + g++ the first time a model, an index
scorer or a strided tensor is created on CPU (about 40 s each). Compiling them here, into
``TORCH_EXTENSIONS_DIR`` (set by :func:`apexdsp.paths.configure_environment` to the project cache),
means that ``apexdsp setup warm`` pays that cost once and every later process only loads the ``.so``.

torch serialises builds with a baton: a ``lock`` file in the extension's folder, created by the builder
and removed when it is done. A builder that is killed (SIGKILL, SIGTERM, a machine that stops) leaves
the file behind, and every later process waits for it forever without a word (seen once: an
experiment restarted after a kill sat idle on it). :func:`load_extensions` therefore takes a lock of
its own first, an ``flock`` that the kernel releases when its holder dies; whoever holds it is the only
apexdsp process that can be building, so any baton it finds is stale and is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from apexdsp.locks import held_lock
from apexdsp.paths import configure_environment

logger = logging.getLogger(__name__)

#: The extensions colbert-ai loads on CPU, by the module name torch gives them.
EXTENSION_NAMES = (
    "segmented_maxsim_cpp",
    "filter_pids_cpp",
    "decompress_residuals_cpp",
    "segmented_lookup_cpp",
)


def _loaders() -> list[tuple[str, Callable[[], None]]]:
    """colbert's own loading hooks, so the compile flags and module names are exactly the ones it uses."""
    from colbert.modeling.colbert import ColBERT
    from colbert.search.index_storage import IndexScorer
    from colbert.search.strided_tensor import StridedTensor

    return [
        ("segmented_maxsim_cpp", lambda: ColBERT.try_load_torch_extensions(use_gpu=False)),
        ("filter_pids_cpp + decompress_residuals_cpp", lambda: IndexScorer.try_load_torch_extensions(use_gpu=False)),
        ("segmented_lookup_cpp", lambda: StridedTensor.try_load_torch_extensions(use_gpu=False)),
    ]


BATON = "lock"  # torch.utils.file_baton.FileBaton's file in each extension's build folder
BUILD_LOCK = ".apexdsp-build.lock"


@contextlib.contextmanager
def extension_build_lock(extensions_dir: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Hold the project's build lock on ``extensions_dir``; yields the stale torch batons it removed."""
    folder = Path(extensions_dir)

    def waiting(holder: str) -> None:
        logger.info("waiting for another process to finish building colbert's extensions (%s)", holder)

    with held_lock(folder / BUILD_LOCK, waiting):
        stale = sorted(folder.glob(f"*/{BATON}"))
        for baton in stale:
            baton.unlink(missing_ok=True)
        yield stale


@contextlib.contextmanager
def project_ninja() -> Iterator[None]:
    """Put the environment's own ``bin`` (the ``ninja`` pinned with the project) first on ``PATH`` while torch
    builds. torch runs the first ``ninja`` on ``PATH``, and ninja versions hash the commands in their build
    log differently: a process started without the environment on ``PATH`` (the system's ninja) and one
    started with it each took the other's build for a stale one and compiled every extension again."""
    previous = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), previous]))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = previous


def load_extensions(verbose: bool = False) -> dict[str, float]:
    """Load colbert-ai's CPU extensions into this process (compiling what is missing) under the build lock;
    returns seconds per step.

    colbert marks each loaded extension on its class, so the searcher and indexer created afterwards skip
    torch's loader, and with it the baton. Safe to call again: torch reuses a compiled module whose sources
    and flags have not changed.
    """
    configure_environment()
    timings: dict[str, float] = {}
    with extension_build_lock(os.environ["TORCH_EXTENSIONS_DIR"]) as stale:
        if stale:
            logger.warning("removed %d stale torch extension lock(s) left by a killed build: %s", len(stale),
                           ", ".join(baton.parent.name for baton in stale))
        # colbert announces each load with a print: to stderr, so that a command's --json stdout stays JSON
        with contextlib.redirect_stdout(sys.stdout if verbose else sys.stderr), project_ninja():
            for name, load in _loaders():
                timings[name] = _timed_load(name, load, verbose)
    return timings


def build_extensions(verbose: bool = True) -> dict[str, float]:
    """Set-up's entry point: compile (or load) the extensions and say how long each took."""
    return load_extensions(verbose=verbose)


def _timed_load(name: str, load: Callable[[], None], verbose: bool) -> float:
    from apexdsp.errors import ApexError

    start = time.perf_counter()
    try:
        load()
    except (RuntimeError, OSError) as error:  # missing compiler or ninja: a set-up problem the user can fix
        raise ApexError(
            f"could not compile colbert extension {name} into {os.environ['TORCH_EXTENSIONS_DIR']}: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__} (needs g++ and ninja)"
        ) from error
    seconds = time.perf_counter() - start
    if verbose:
        print(f"[colbert] {name}: ready in {seconds:.1f}s")
    return seconds


if __name__ == "__main__":
    build_extensions()
