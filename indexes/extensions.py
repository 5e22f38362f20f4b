"""Compile colbert-ai's C++ extensions once, at set-up, instead of inside the first query.

colbert-ai JIT-compiles four small C++ extensions with ninja + g++ the first time a model, an index
scorer or a strided tensor is created on CPU (about 40 s each). Compiling them here, into
``TORCH_EXTENSIONS_DIR`` (set by :func:`apexdsp.paths.configure_environment` to the project cache),
means that ``apexdsp setup warm`` pays that cost once and every later process only loads the ``.so``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from apexdsp.paths import configure_environment

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


def build_extensions(verbose: bool = True) -> dict[str, float]:
    """Compile (or load, when already cached) colbert-ai's CPU extensions; returns seconds per step.

    Safe to call again: torch reuses the compiled module when its sources and flags have not changed.
    """
    configure_environment()
    import os

    from apexdsp.errors import ApexError

    timings: dict[str, float] = {}
    for name, load in _loaders():
        start = time.perf_counter()
        try:
            load()
        except (RuntimeError, OSError) as error:  # missing compiler or ninja: a set-up problem the user can fix
            raise ApexError(
                f"could not compile colbert extension {name} into {os.environ['TORCH_EXTENSIONS_DIR']}: "
                f"{str(error).splitlines()[0] if str(error) else type(error).__name__} (needs g++ and ninja)"
            ) from error
        timings[name] = time.perf_counter() - start
        if verbose:
            print(f"[colbert] {name}: ready in {timings[name]:.1f}s")
    return timings


if __name__ == "__main__":
    build_extensions()
