"""``apexdsp serve``: the local LM engine behind an OpenAI-compatible HTTP API (uvicorn, loopback by default)."""

from __future__ import annotations

import errno
import socket
from typing import Annotated

import typer
from rich.console import Console

from apexdsp.errors import ApexError, ModelNotAvailable

console = Console()
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")

SERVE_HELP = (
    "Serve a local model over an OpenAI-compatible HTTP API: POST /v1/chat/completions, GET /v1/models.\n\n"
    "Concurrent requests share the one engine, whose worker decodes them as one batch. Streaming, tools, "
    "response_format and logprobs are not offered (a 400 names the field).\n\n"
    "Any command then uses the server with --lm openai/NAME and the server's address in OPENAI_API_BASE "
    "(OPENAI_API_KEY must be set, to anything: the server checks none):\n\n"
    "  apexdsp serve --lm smollm2-135m --port 8000\n\n"
    "  OPENAI_API_BASE=http://127.0.0.1:8000/v1 OPENAI_API_KEY=local apexdsp evaluate --program vanilla "
    "--lm openai/smollm2-135m --limit 20\n\n"
    "From Python: dspy.LM(\"openai/smollm2-135m\", api_base=\"http://127.0.0.1:8000/v1\", api_key=\"local\")."
)

def register(app: typer.Typer) -> None:
    """Add ``serve`` to the root command."""
    app.command("serve", help=SERVE_HELP)(serve)


def serve(
    lm: Annotated[str, typer.Option("--lm", help=(
        "Local model to serve: a known name (apexdsp lm list) or a transformers folder (hf:/path). Clients "
        "send it as the request's model (openai/NAME through DSPy)."))] = "smollm2-135m",
    host: Annotated[str, typer.Option(help=(
        "Address to listen on. The server checks no API key: keep it on loopback unless the network is "
        "trusted."))] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one, printed).")] = 8000,
    log_level: Annotated[str, typer.Option(help=(
        f"uvicorn's log level: {', '.join(LOG_LEVELS)} (info logs every request)."))] = "info",
) -> None:
    # The mistakes a user makes (a model name that does not exist, a port already taken) are refused
    # before torch or the weights load.
    name = lm.strip()
    if log_level not in LOG_LEVELS:
        raise ApexError(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    check_servable(name)
    listener = bind(host, port)
    try:
        _serve(name, host, listener, log_level)
    finally:
        listener.close()


def _serve(name: str, host: str, listener: socket.socket, log_level: str) -> None:
    """Load the model, then answer on ``listener`` until interrupted."""
    import uvicorn

    from apexdsp.lm.registry import local_engine
    from apexdsp.lm.server import create_app

    engine = local_engine(name)
    engine.load()
    address = f"[{host}]" if ":" in host else host
    console.print(f"serving {name} on http://{address}:{listener.getsockname()[1]}/v1 (OpenAI-compatible; "
                  "Ctrl-C stops it)", highlight=False, soft_wrap=True)
    config = uvicorn.Config(create_app(engine, name), log_level=log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn stopped gracefully on Ctrl-C, then re-raised it
        pass
    finally:
        engine.close()


def check_servable(name: str) -> None:
    """Raise a one-line :class:`ModelNotAvailable` unless ``name`` is a local model (without loading it)."""
    from apexdsp.lm.gguf_models import GGUF_MODELS, locate_gguf
    from apexdsp.lm.local_models import is_local, resolve_local

    if name in GGUF_MODELS:
        locate_gguf(name)  # the package that holds the weights is installed
        return
    if is_local(name) or name.startswith(("/", ".", "~")):
        resolve_local(name)  # a transformers folder (config.json)
        return
    known = ", ".join(sorted(GGUF_MODELS))
    served_elsewhere = (f"; {name!r} is a LiteLLM model string, which needs no apexdsp server (use it with "
                        "--lm directly)") if "/" in name else ""
    raise ModelNotAvailable(f"--lm {name!r}: not a local model; serve one of {known} or a transformers folder "
                            f"(hf:/path){served_elsewhere}")


def bind(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, for uvicorn; a port in use is a one-line error.

    It listens at once, so the port is held while the model loads (connections made meanwhile wait).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise ApexError(f"--host {host!r}: not an address to listen on ({error.strerror})") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        listener.bind(address)
        listener.listen(2048)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise ApexError(f"port {port} on {host} is already in use; stop what listens there or choose another "
                            "with --port") from None
        raise ApexError(f"cannot listen on {host}:{port} ({error.strerror})") from None
    return listener
