"""Configure DSPy for an apexdsp process: the LM by name, the tolerant adapter, the cache."""

from __future__ import annotations

import logging
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
    _log_truncation_once()
    return model


class _FirstTruncationOnly(logging.Filter):
    """Lets DSPy's "LM response was truncated" warning through once per process.

    apexdsp's programs cap each module's reply on purpose (a 135M model rambles; a yes/no step gets one
    token), so most calls of an evaluation end at their cap and DSPy would print one warning per call.
    """

    seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncated" not in record.getMessage():
            return True
        if _FirstTruncationOnly.seen:
            return False
        _FirstTruncationOnly.seen = True
        record.msg = f"{record.msg} (apexdsp caps replies on purpose; further truncations are not logged)"
        return True


def _log_truncation_once() -> None:
    logger = logging.getLogger("dspy.clients.lm")
    if not any(isinstance(f, _FirstTruncationOnly) for f in logger.filters):
        logger.addFilter(_FirstTruncationOnly())
