"""Which model names run in-process, and the transformers folder behind each.

A local model is a packaged GGUF model known by name (``smollm2-135m``, converted once to safetensors), a
transformers folder given as ``hf:/path`` or as a plain path. :func:`local_source` names it the way a saved
program records it (the registry name, or the folder's resolved path), so ``hf:/x`` and ``/x`` are one
model and loading a program elsewhere finds the model again.
"""

from __future__ import annotations

from pathlib import Path

from apexdsp.errors import ModelNotAvailable
from apexdsp.lm.gguf_models import GGUF_MODELS, ensure_converted, locate_gguf


def is_local(name: str) -> bool:
    """Whether ``name`` is served in-process (a known model, ``hf:...``, or an existing folder)."""
    return name in GGUF_MODELS or name.startswith("hf:") or Path(name).expanduser().is_dir()


def resolve_local(name: str) -> Path:
    """The transformers folder behind a local model name (converting a packaged GGUF once)."""
    if name in GGUF_MODELS:
        locate_gguf(name)  # the one-line "pip install ..." error before any slow work
        return ensure_converted(name)
    folder = Path(name.removeprefix("hf:")).expanduser()
    if not folder.is_dir():
        raise ModelNotAvailable(f"model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelNotAvailable(f"{folder} is not a transformers model folder (no config.json)")
    return folder.resolve()


def local_source(name: str) -> tuple[str, Path]:
    """``(source, folder)``: the name a saved program records for a local model, and its folder."""
    folder = resolve_local(name)
    return (name if name in GGUF_MODELS else str(folder)), folder
