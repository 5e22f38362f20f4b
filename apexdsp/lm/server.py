"""A local engine behind an OpenAI-compatible HTTP API: ``POST /v1/chat/completions``, ``GET /v1/models``.

Every request goes to the one :class:`~apexdsp.lm.engine.LocalEngine` the app is built over, through the
same path a DSPy ``acall`` takes (:class:`~apexdsp.lm.engine.AsyncLocalEngine`): requests arriving together,
and the ``n`` choices of one request, are decoded as rows of one batch by the engine's worker.

A request body becomes the canonical request DSPy itself builds (``dspy.lm15.request_from_openai_chat``),
and the engine applies or refuses its settings exactly as it does for a DSPy call: a setting it cannot apply
(``response_format``, ``logprobs``, non-zero penalties, tools) is a 400 naming it, never silently dropped.
Fields this front does not know at all are refused the same way; a few that cannot change the reply
(``user``, ``metadata``...) are accepted. Streaming is not offered: ``stream: true`` is a 400.
``GET /stats`` gives the engine worker's batching counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from dspy.lm15 import CapabilityError, Request, Response, request_from_openai_chat
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from apexdsp.lm.engine import AsyncLocalEngine, LocalEngine
from apexdsp.lm.request_settings import PromptTooLong

logger = logging.getLogger(__name__)

MAX_CHOICES = 16  # n per request (the choices of one request decode as rows of one batch)

# Top-level fields the engine applies, or refuses itself with the message a DSPy call gets (unless unset,
# false or 0): penalties, response_format, logprobs, tools.
APPLIED_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed",
    "logit_bias", "n", "stream", "frequency_penalty", "presence_penalty", "response_format", "logprobs",
    "top_logprobs", "tools", "functions",
})
# Fields that leave the reply as it is: accepted, not used.
INERT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "stream_options", "safety_identifier"})


class RequestRefused(Exception):
    """A request this server does not answer: an HTTP status and one line for the client."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse(status_code=self.status, content={"error": {
            "message": str(self), "type": kind, "param": self.param, "code": self.code}})


def parse_chat_request(body: Any, served: str) -> tuple[Request, int]:
    """The canonical request and the number of choices of a Chat Completions body sent to model ``served``.

    Raises :class:`RequestRefused` for a body this server does not answer: not a JSON object, streaming,
    another model, a bad ``n``, a field it does not support, or malformed values.
    """
    if not isinstance(body, dict):
        raise RequestRefused("the request body must be a JSON object (a Chat Completions request)")
    if body.get("stream"):
        raise RequestRefused("stream=true is not supported: this server answers with one JSON body; leave "
                             "stream unset or false", param="stream")
    unknown = sorted(set(body) - APPLIED_FIELDS - INERT_FIELDS)
    if unknown:
        names = ", ".join(repr(name) for name in unknown)
        raise RequestRefused(f"request field{'s' if len(unknown) > 1 else ''} {names} not supported by the local "
                             "engine (it would change the reply); leave "
                             f"{'them' if len(unknown) > 1 else 'it'} out", param=unknown[0])
    if not body.get("model"):
        raise RequestRefused(f"model is required; this server serves {served!r}", param="model")
    if body["model"] != served:
        raise RequestRefused(f"model {body['model']!r} is not served here; this server serves {served!r} "
                             "(GET /v1/models)", status=404, param="model", code="model_not_found")
    n = 1 if body.get("n") is None else body["n"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise RequestRefused(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}", param="n")
    canonical = {key: value for key, value in body.items() if key not in ("n", "stream", "stream_options")}
    try:
        return request_from_openai_chat(canonical), n
    except (CapabilityError, ValueError, TypeError) as error:
        raise RequestRefused(str(error)) from None


def chat_response(served: str, responses: list[Response]) -> dict[str, Any]:
    """The Chat Completions body for the choices of one request (they share one prompt)."""
    prompt_tokens = responses[0].usage.input_tokens or 0
    completion_tokens = sum(response.usage.output_tokens or 0 for response in responses)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": [{"index": index, "message": {"role": "assistant", "content": response.text or ""},
                     "finish_reason": response.finish_reason, "logprobs": None}
                    for index, response in enumerate(responses)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


async def complete_choices(engine: AsyncLocalEngine, request: Request, n: int) -> list[Response]:
    """``n`` completions of one request, queued together so that they decode as rows of one batch.

    The same request object is sent ``n`` times, as DSPy does: with a ``seed``, choice ``i`` draws with
    ``seed + i`` (see :meth:`LocalEngine.candidate_index`). A setting the engine refuses is a
    :class:`RequestRefused` raised before anything is queued.
    """
    try:
        return list(await asyncio.gather(*(engine.complete(request) for _ in range(n))))
    except PromptTooLong as error:
        raise RequestRefused(str(error), param="messages", code="context_length_exceeded") from None
    except (CapabilityError, ValueError) as error:  # refused settings; out-of-range values (SamplingParams)
        feature = getattr(error, "feature", None)  # "config.response_format" for a refused setting
        raise RequestRefused(str(error), param=feature.rpartition(".")[2] if feature else None) from None


def create_app(engine: LocalEngine, served: str) -> FastAPI:
    """The HTTP app over ``engine``, answering for the model name ``served``."""
    app = FastAPI(title="apexdsp local LM", docs_url=None, redoc_url=None, openapi_url=None)
    async_engine = AsyncLocalEngine(engine)
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served, "object": "model", "created": created,
                                            "owned_by": "apexdsp"}]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """The engine worker's counters (``largest_batch`` above one: requests were decoded together)."""
        return engine.stats().as_dict()

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: HTTPRequest) -> Any:
        try:
            try:
                body = await http_request.json()
            except ValueError:
                raise RequestRefused("the request body is not valid JSON") from None
            request, n = parse_chat_request(body, served)
            responses = await complete_choices(async_engine, request, n)
        except RequestRefused as refused:
            return refused.response()
        except Exception as error:  # generation failed (a bug, out of memory): the client gets the line
            logger.exception("chat completion failed")
            return RequestRefused(f"generation failed: {error}", status=500).response()
        return chat_response(served, responses)

    return app


__all__ = ["MAX_CHOICES", "RequestRefused", "chat_response", "create_app", "parse_chat_request"]
