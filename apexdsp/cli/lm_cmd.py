"""``apexdsp lm``: try a language model through the same DSPy LM the programs use."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import typer
from rich.console import Console

from apexdsp.errors import ApexError

app = typer.Typer(help="Try the language models (local ones run in-process).", no_args_is_help=True)
console = Console()


@app.callback()
def _group() -> None:
    """Try the language models (local ones run in-process)."""


@app.command("list")
def list_models() -> None:
    """The local model names that --lm accepts (besides folders and LiteLLM model strings)."""
    import importlib.util

    from rich.table import Table

    from apexdsp.lm.gguf_models import GGUF_MODELS, is_converted

    table = Table("name", "model", "state")
    for name, model in GGUF_MODELS.items():
        installed = importlib.util.find_spec(model.package) is not None
        state = "converted" if is_converted(name) else "installed" if installed else f"missing: {model.install}"
        table.add_row(name, model.description, state)
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    lm: Annotated[str, typer.Option("--lm", help="Model name, local folder or LiteLLM model string.")] = "smollm2-135m",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Token budget per completion.")] = 128,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", min=0.0, help="0 is greedy; default: a local model folder's generation_config.json, "
        "else 0.")] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="Number of completions (sampled when temperature > 0).")] = 1,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Makes sampling reproducible; completion i draws with seed + i.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="Optional system message.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")] = False,
) -> None:
    """Complete PROMPT with the chat template applied, and report token usage and speed."""
    if not prompt.strip():
        raise ApexError('the prompt is empty; give the text to send, e.g. apexdsp lm generate "What is DSPy?"')
    from apexdsp.paths import configure_environment

    configure_environment()
    import logging

    from dspy.lm15 import Config, Message, Request

    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # truncation is shown as finish_reason

    from apexdsp.lm.registry import get_lm, is_local

    model = get_lm(lm, cache=False)
    if temperature is None and not is_local(lm):
        temperature = 0.0  # a local engine fills an unset temperature from the model folder itself
    requests = [Request(model=model.model, messages=(Message.user(prompt),), system=system,
                        config=Config(max_tokens=max_tokens, temperature=temperature,
                                      seed=None if seed is None else seed + index))
                for index in range(n)]
    started = time.perf_counter()
    # n concurrent calls rather than lm(..., n=n), which DSPy runs one after another: the local engine
    # decodes concurrent calls as one batch.
    with ThreadPoolExecutor(max_workers=n) as pool:
        responses = list(pool.map(lambda request: _complete(model, request), requests))
    seconds = time.perf_counter() - started
    completion_tokens = sum(r.usage.output_tokens or 0 for r in responses)
    result = {
        "model": lm,
        "completions": [r.text or "" for r in responses],
        "finish_reasons": [r.finish_reason for r in responses],
        "usage": {"prompt_tokens": responses[0].usage.input_tokens, "completion_tokens": completion_tokens},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(completion_tokens / seconds, 2) if seconds > 0 else None,
    }
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    for index, text in enumerate(result["completions"]):
        if n > 1:
            console.rule(f"completion {index + 1}", style="dim")
        console.print(text, highlight=False, markup=False)
    console.print(f"[dim]{result['usage']['prompt_tokens']} prompt + {completion_tokens} completion tokens "
                  f"({', '.join(result['finish_reasons'])}), {seconds:.1f}s including model load[/]")


def _complete(model, request):
    """One completion. An LM error that a user error caused (a prompt longer than the model's context, a
    setting the engine refuses) is raised as that error's one line."""
    from dspy.lm15 import CapabilityError
    from dspy.utils.exceptions import LMError

    try:
        return model(request)
    except LMError as error:
        cause = error.__cause__
        if isinstance(cause, ApexError):
            raise cause from None
        if isinstance(cause, CapabilityError):
            raise ApexError(cause.message) from None
        raise
