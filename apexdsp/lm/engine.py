"""A local transformers model as a DSPy 3.4 engine: ``dspy.LM("local/NAME", engine=LocalEngine(...))``.

DSPy 3.4 deprecates subclassing ``BaseLM.forward`` (a wrong return shape silently yields empty
predictions); the supported way is an engine whose ``complete(Request)`` returns a ``dspy.lm15.Response``.
DSPy then keeps what it owns — the response cache, retries, ``n`` (it calls ``complete`` once per
candidate), history, usage tracking and callbacks — and the engine only turns one canonical request into
one completion. Requests from many threads go through one :class:`~apexdsp.lm.batching.BatchScheduler`,
so concurrent DSPy calls are decoded as one batch.

A request setting what the engine cannot do (penalties, ``response_format``, ``logprobs``, tools) is
refused with a one-line ``UnsupportedFeatureError`` rather than answered as if it were not set.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from dspy.lm15 import Message, Request, Response, Usage, UnsupportedFeatureError, response_to_events

from apexdsp.errors import ModelNotAvailable
from apexdsp.lm.batching import BatchingConfig, BatchScheduler, BatchStats
from apexdsp.lm.generation import MAX_PREFILL_PADDING, Completion, DecodeBatch, SamplingParams
from apexdsp.lm.local_models import local_source
from apexdsp.lm.request_settings import PromptTooLong, generation_defaults, refuse_unsupported

CANDIDATE_MEMORY = 256  # seeded requests remembered to number DSPy's repeated sends of one request
# Two engines loading at once (a program's modules on different weights, first called from many threads)
# made transformers fail with "Cannot copy out of meta tensor": its loading is not thread-safe.
_FROM_PRETRAINED = threading.Lock()
# Each local model loads once per process: one engine per (source, config), shared by every LM over it.
_SHARED: dict[tuple[str, "EngineConfig"], "LocalEngine"] = {}
_SHARED_LOCK = threading.Lock()


@dataclass(frozen=True)
class EngineConfig:
    """How the local model runs.

    ``dtype="auto"`` runs bfloat16 where the CPU multiplies it natively (AVX512-BF16 or AMX) and float32
    elsewhere, where bfloat16 would be emulated and slow. Measured through DSPy on this shared 2-core CPU
    (benchmarks/lm_throughput.py): bfloat16 decodes 8 concurrent requests at 92-140 tokens/s against
    33-40 for float32, whose small-batch matrix products run at half the speed. The price: bfloat16's
    logit noise (about 0.5) flips near-ties, so a greedy answer can change when the prompt is padded into
    a batch (SmolLM2's first token for "What is the capital of France?" went from "The" to "L"); float32
    logits agree to 5e-5 alone or batched. Choose ``dtype="float32"`` when an evaluation must give the
    same answers whatever its ``num_threads``. The weights come from a 4-bit GGUF either way.
    """

    dtype: str = "auto"  # "auto", "bfloat16" or "float32"
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads (process-wide); None leaves torch's choice
    max_batch_size: int = 16
    collect_window_s: float = 0.005
    join_running: bool = True
    default_max_tokens: int = 512  # when neither the LM nor the call sets max_tokens
    default_temperature: float = 0.0  # when neither sets temperature: greedy, reproducible
    prefix_cache_size: int = 8  # shared prompt prefixes (system message + demos) whose KV states are kept
    max_prefill_padding: float = MAX_PREFILL_PADDING  # share of a prefill pass's token slots padding may take

    def batching(self) -> BatchingConfig:
        return BatchingConfig(self.max_batch_size, self.collect_window_s, self.join_running)


class LocalEngine:
    """Serves one local causal LM folder (safetensors + tokenizer) to DSPy.

    ``source`` is what :func:`apexdsp.lm.local_models.resolve_local` understands (a registry name such as
    ``smollm2-135m`` or a folder); it is what a saved program records, so that loading it elsewhere
    finds the model again without a machine-specific path. The weights load on the first request.
    Sampling settings a request leaves unset come from the folder's ``generation_config.json``, else
    from :class:`EngineConfig`.
    """

    # Capability hints DSPy's adapters read: a 135M model follows the text format, nothing more.
    supports_function_calling = False
    supports_reasoning = False
    supports_response_schema = False

    def __init__(self, source: str, model_dir: str | Path, config: EngineConfig | None = None) -> None:
        self.source = source
        self.model_dir = Path(model_dir)
        self.config = config or EngineConfig()
        self._load_lock = threading.Lock()
        self._tokenizer: Any = None
        self._model: Any = None
        self._generation_defaults: dict[str, Any] | None = None
        self._candidates: OrderedDict[int, tuple[Request, int]] = OrderedDict()
        self._candidates_lock = threading.Lock()
        self._scheduler = BatchScheduler(self._new_batch, self.config.batching())

    # -- DSPy engine contract ----------------------------------------------------------------------

    def complete(self, request: Request) -> Response:
        return self._response(request, self.submit(request).result())

    def submit(self, request: Request) -> Future:
        """Queue the request with the batching worker; the future resolves to a ``Completion``."""
        params = self.sampling_params(request)
        prompt_ids, prefix_len = self.prompt_ids(request)
        candidate = self.candidate_index(request)
        if candidate:
            params = replace(params, seed=params.seed + candidate)
        return self._scheduler.submit(prompt_ids, params, prefix_len)

    def candidate_index(self, request: Request) -> int:
        """How many times this very request object came before: 0 for a new one, then 1, 2...

        DSPy draws ``n`` candidates by sending one request object ``n`` times; with a fixed seed they would
        be ``n`` identical samples, so candidate ``i`` draws with ``seed + i``. Every DSPy call builds a new
        request, so a fixed seed gives the same ``n`` samples again. A caller that sends one
        :class:`Request` object itself again gets the next candidate, not a repeat. Unseeded requests
        are not counted (they draw from torch's global generator anyway).
        """
        if request.config.seed is None:
            return 0
        with self._candidates_lock:
            seen = self._candidates.pop(id(request), None)
            index = seen[1] + 1 if seen is not None and seen[0] is request else 0
            self._candidates[id(request)] = (request, index)  # the reference keeps id(request) unique
            while len(self._candidates) > CANDIDATE_MEMORY:
                self._candidates.popitem(last=False)
        return index

    @staticmethod
    def _response(request: Request, completion: Completion) -> Response:
        return Response(
            id=None,
            model=request.model,
            message=Message.assistant(completion.text),
            finish_reason=completion.finish_reason,
            usage=Usage(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens),
        )

    def stream(self, request: Request):
        """DSPy streaming: the completion arrives as one chunk (the batch decodes rows in lockstep)."""
        return response_to_events(self.complete(request))

    def close(self) -> None:
        """DSPy never closes a borrowed engine; call this to stop the worker of an engine you own."""
        self._scheduler.close()

    def dump_state(self) -> dict:
        return {"source": self.source, "config": asdict(self.config)}

    @classmethod
    def load_state(cls, state: dict) -> "LocalEngine":
        return cls.shared(state["source"], EngineConfig(**state.get("config", {})))

    @classmethod
    def shared(cls, name: str, config: EngineConfig | None = None) -> "LocalEngine":
        """The process's engine for a known model or a folder (converting a GGUF model on first use)."""
        config = config or EngineConfig()
        with _SHARED_LOCK:
            source, folder = local_source(name)
            engine = _SHARED.get((source, config))
            if engine is None:
                engine = _SHARED[(source, config)] = cls(source, folder, config)
            return engine

    # -- request translation -------------------------------------------------------------------------

    def chat_messages(self, request: Request) -> list[dict[str, str]]:
        """The request as chat-template messages (system first)."""
        if request.tools:
            raise UnsupportedFeatureError(f"{request.model}: a local model does not take tools")
        messages: list[dict[str, str]] = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(
                getattr(part, "text", "") for part in request.system)
            messages.append({"role": "system", "content": system})
        for message in request.messages:
            if message.text is None:
                raise UnsupportedFeatureError(f"{request.model}: a local model takes text messages only")
            role = {"developer": "system"}.get(message.role, message.role)
            if role not in ("system", "user", "assistant"):
                raise UnsupportedFeatureError(f"{request.model}: role {message.role!r} is not supported")
            messages.append({"role": role, "content": message.text})
        return messages

    def prompt_ids(self, request: Request) -> tuple[list[int], int]:
        """Token ids of the prompt, and how many leading ones are shared with other calls.

        The chat template is applied when the model has one, else the plain texts are joined. A prompt that
        ends in an assistant message is a prefilled reply: the model continues that message instead of
        opening a new one. The shared part is everything before the last user message (system message and
        demos, identical for every call of one DSPy predictor), when its tokens are a prefix of the prompt's.
        """
        tokenizer = self.tokenizer
        messages = self.chat_messages(request)
        prefix: list[int] = []
        if getattr(tokenizer, "chat_template", None):
            ids = _token_list(tokenizer.apply_chat_template(messages, tokenize=True, **template_mode(messages)))
            shared = shared_turns(messages)
            if shared:
                prefix = _token_list(tokenizer.apply_chat_template(messages[:shared], tokenize=True))
        else:  # a base model (e.g. Gemma-3-270m): continue the concatenated text
            ids = tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        limit = self.context_length
        if limit and len(ids) >= limit:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens, the model's context is {limit} (and the reply "
                                "needs at least one more); shorten the prompt")
        return ids, len(prefix) if prefix and ids[: len(prefix)] == prefix else 0

    def sampling_params(self, request: Request) -> SamplingParams:
        """The request's sampling settings; an unset one comes from ``generation_config.json``, else from
        :class:`EngineConfig`. Settings the engine cannot apply are refused (:func:`refuse_unsupported`)."""
        refuse_unsupported(request)
        config = request.config
        defaults = {"max_tokens": self.config.default_max_tokens, "temperature": self.config.default_temperature,
                    "top_p": 1.0, "top_k": 0, **self.generation_defaults}

        def setting(name: str) -> Any:
            value = getattr(config, name)
            return value if value is not None else defaults[name]

        extensions = config.extensions or {}
        bias = tuple((int(token), float(value)) for token, value in (extensions.get("logit_bias") or {}).items())
        return SamplingParams(
            max_tokens=int(setting("max_tokens")),
            temperature=float(setting("temperature")),
            top_p=float(setting("top_p")),
            top_k=int(setting("top_k") or 0),
            stop=tuple(s for s in config.stop if s),
            seed=config.seed,
            logit_bias=bias,
        )

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The model folder's sampling defaults (read once, without loading the weights)."""
        if self._generation_defaults is None:
            self._generation_defaults = generation_defaults(self.model_dir)
        return self._generation_defaults

    # -- model ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    @property
    def model(self) -> Any:
        self.load()
        return self._model

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    def stats(self) -> BatchStats:
        """Counters of the batching worker (rows per step, tokens, busy time)."""
        return self._scheduler.stats()

    def reset_stats(self) -> None:
        self._scheduler.reset_stats()

    def load(self) -> None:
        """Load tokenizer and weights once (thread-safe); a broken folder is a one-line error."""
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is not None:
                return
            if not (self.model_dir / "config.json").is_file():
                raise ModelNotAvailable(f"{self.model_dir}: not a transformers model folder (no config.json)")
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from apexdsp.lm.attention import NAME as DECODE_ATTENTION

            if self.config.num_threads:
                torch.set_num_threads(self.config.num_threads)
            with _FROM_PRETRAINED:  # one model at a time: transformers' loading is not thread-safe
                tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype),
                                                             attn_implementation=DECODE_ATTENTION)
            self._tokenizer = tokenizer
            self._model = model.to(self.config.device).eval()

    @property
    def dtype(self) -> str:
        """The torch dtype name the weights run in (``auto`` resolved)."""
        if self.config.dtype != "auto":
            return self.config.dtype
        return "bfloat16" if self.config.device == "cpu" and cpu_has_native_bf16() else "float32"

    def eos_ids(self) -> set[int]:
        """Every token that ends a turn: the tokenizer's EOS plus the generation config's list."""
        ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
        return ids

    def _new_batch(self) -> DecodeBatch:
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return DecodeBatch(self.model, tokenizer, self.eos_ids(), pad, self.config.prefix_cache_size,
                           self.config.max_prefill_padding)

    def __repr__(self) -> str:
        return f"LocalEngine({self.source!r}, {json.dumps(asdict(self.config))})"


class AsyncLocalEngine:
    """The async face of a :class:`LocalEngine` (``dspy.LM(..., async_engine=...)``), for ``acall``.

    It queues into the same worker, so requests from asyncio tasks and from threads batch together.
    """

    supports_function_calling = supports_reasoning = supports_response_schema = False

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def complete(self, request: Request) -> Response:
        import asyncio

        completion = await asyncio.wrap_future(self.engine.submit(request))
        return LocalEngine._response(request, completion)

    async def stream(self, request: Request):
        for event in response_to_events(await self.complete(request)):
            yield event

    async def aclose(self) -> None:
        """Borrowed by DSPy: the shared engine outlives any one LM."""

    def dump_state(self) -> dict:
        return self.engine.dump_state()

    @classmethod
    def load_state(cls, state: dict) -> "AsyncLocalEngine":
        return cls(LocalEngine.load_state(state))


def shared_engines() -> list[LocalEngine]:
    """Every engine :meth:`LocalEngine.shared` has loaded in this process."""
    with _SHARED_LOCK:
        return list(_SHARED.values())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (Linux ``/proc/cpuinfo`` flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def template_mode(messages: list[dict[str, str]]) -> dict[str, bool]:
    """``apply_chat_template`` flags: open a new assistant turn, or continue a prefilled one."""
    continues = bool(messages) and messages[-1]["role"] == "assistant"
    return {"add_generation_prompt": not continues, "continue_final_message": continues}


def shared_turns(messages: list[dict[str, str]]) -> int:
    """How many leading messages come before the last user turn (0 if that is the first message)."""
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    return users[-1] if users else 0


def _token_list(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list, or a BatchEncoding in some versions."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
