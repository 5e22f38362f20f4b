"""Configure DSPy for an apexdsp process: the LM by name, the tolerant adapter, the cache."""

from __future__ import annotations

from typing import Any

import dspy

from apexdsp.lm.adapter import TolerantChatAdapter


def configure_dspy(lm: str | Any = "smollm2-135m", *, cache: bool = False, **lm_kwargs: Any) -> Any:
    """Set the default LM (a registry name or a ``dspy.LM``) and adapter for every module.

    The cache is off by default for evaluations, so that reported timings are real; turn it on for
    iterative development.
    """
    from apexdsp.lm.registry import get_lm

    model = get_lm(lm, **lm_kwargs) if isinstance(lm, str) else lm
    dspy.configure_cache(enable_disk_cache=cache, enable_memory_cache=cache)
    dspy.configure(lm=model, adapter=TolerantChatAdapter())
    return model
