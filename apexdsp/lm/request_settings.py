"""What a request to the local engine may set, and what a model folder sets when the request does not.

The engine refuses a setting it cannot apply instead of answering as if it were unset, reads the sampling
defaults of a model folder's ``generation_config.json``, and names a prompt too long for the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dspy.lm15 import ContextLengthError, LM15Error, Request, UnsupportedFeatureError

from apexdsp.errors import ApexError, ModelNotAvailable

# generation_config.json keys the engine honours as defaults, with the request field each one fills.
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                          "max_new_tokens": "max_tokens"}


class PromptTooLong(ApexError, ContextLengthError):
    """A prompt that leaves no room in the model's context, said in one line.

    The CLI prints it as a user error; through DSPy it arrives as ``ContextWindowExceededError`` (which
    modules such as ReAct handle by shortening their trajectory), with this error as its cause.
    """

    def __init__(self, message: str) -> None:
        LM15Error.__init__(self, message)  # without ContextLengthError's multi-line advice


def refuse_unsupported(request: Request) -> None:
    """Raise a one-line ``UnsupportedFeatureError`` for a setting the local engine would otherwise ignore.

    The message leaves the model out: DSPy puts it in front of every LM error it raises.
    """
    config = request.config
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(config, name):  # unset or 0 changes nothing
            raise UnsupportedFeatureError(
                f"the local engine does not apply {name} (got {getattr(config, name)}); "
                f"leave it unset or 0, or serve the model with vLLM (hosted_vllm/...) to use it",
                feature=f"config.{name}")
    if config.response_format is not None:
        raise UnsupportedFeatureError(
            f"the local engine cannot constrain a reply to response_format "
            f"{config.response_format.get('type')!r}; leave it unset (DSPy's ChatAdapter, the default, parses "
            "fields from plain text) or serve the model with vLLM (hosted_vllm/...)",
            feature="config.response_format")
    if config.logprobs is not None:
        raise UnsupportedFeatureError("the local engine does not return logprobs; leave it unset",
                                      feature="config.logprobs")


def generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """The sampling defaults a model folder's ``generation_config.json`` sets, under the request's names.

    ``temperature``, ``top_p``, ``top_k`` and ``max_new_tokens`` (as ``max_tokens``) are read where set;
    ``do_sample: false`` means greedy decoding (temperature 0) whatever temperature is listed, as in
    transformers. A folder without the file has no defaults; an unreadable one is a one-line error.
    """
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ModelNotAvailable(f"{path}: not a readable generation config ({error})") from None
    if not isinstance(config, dict):
        raise ModelNotAvailable(f"{path}: not a readable generation config (not a JSON object)")
    defaults = {ours: config[theirs] for theirs, ours in GENERATION_CONFIG_KEYS.items()
                if config.get(theirs) is not None}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


__all__ = ["PromptTooLong", "generation_defaults", "refuse_unsupported"]
