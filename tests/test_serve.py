"""``apexdsp serve`` for real: the local engine behind an OpenAI-compatible API, used through DSPy and by
another apexdsp command, and the user errors it refuses before loading anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

APEXDSP = str(Path(sys.executable).parent / "apexdsp")
MODEL = "smollm2-135m"
START_TIMEOUT_S = 300  # imports and the model load, on a shared 2-core CPU


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``apexdsp serve`` on a free port, as a subprocess; the base URL once ``/v1/models`` answers."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([APEXDSP, "serve", "--lm", MODEL, "--port", str(port), "--log-level", "warning"],
                                   stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"apexdsp serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                # the port listens from the start: a request made while the model loads waits for it
                if httpx.get(f"{base}/v1/models", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"apexdsp serve did not answer in {START_TIMEOUT_S}s:\n{log.read_text()}")
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def shared_steps(before: dict, after: dict) -> int:
    """Decoding steps between two ``/stats`` readings that ran more than one row."""
    return sum(count - before["step_sizes"].get(size, 0) for size, count in after["step_sizes"].items()
               if int(size) >= 2)


def chat(base: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], **body}
    return httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=300)


@pytest.mark.slow
def test_models_lists_the_served_model(server):
    listing = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [model["id"] for model in listing["data"]] == [MODEL]


@pytest.mark.slow
def test_dspy_predict_through_the_openai_path(server):
    import dspy

    from apexdsp.lm.adapter import TolerantChatAdapter

    lm = dspy.LM(f"openai/{MODEL}", api_base=f"{server}/v1", api_key="local", max_tokens=24, cache=False)
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        prediction = dspy.Predict("question -> answer")(question="What is the capital of France?")
    assert prediction.answer.strip()
    usage = lm.history[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.slow
def test_n_choices_decode_together_in_one_engine(server):
    before = httpx.get(f"{server}/stats", timeout=10).json()
    reply = chat(server, n=2, max_tokens=8, temperature=0.8, seed=3)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    for choice in body["choices"]:
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = httpx.get(f"{server}/stats", timeout=10).json()
    assert after["requests"] - before["requests"] == 2
    assert shared_steps(before, after) > 0  # the two choices were rows of the same decoding steps


@pytest.mark.slow
def test_concurrent_requests_share_the_engine(server):
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}]
    before = httpx.get(f"{server}/stats", timeout=10).json()
    with ThreadPoolExecutor(max_workers=2) as pool:
        replies = list(pool.map(lambda _: chat(server, messages=story, max_tokens=16), range(2)))
    assert [reply.status_code for reply in replies] == [200, 200], [reply.text for reply in replies]
    after = httpx.get(f"{server}/stats", timeout=10).json()
    assert after["requests"] - before["requests"] == 2
    assert shared_steps(before, after) > 0  # the two requests were rows of the same decoding steps


@pytest.mark.slow
@pytest.mark.parametrize(("body", "field"), [
    ({"stream": True}, "stream"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"n": 0}, "n must"),
])
def test_what_the_engine_cannot_do_is_a_400_naming_the_field(server, body, field):
    reply = chat(server, max_tokens=4, **body)
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert field in message and "\n" not in message


@pytest.mark.slow
def test_another_model_name_is_a_404(server):
    reply = chat(server, model="gpt-4o", max_tokens=4)
    assert reply.status_code == 404 and "smollm2-135m" in reply.json()["error"]["message"]


@pytest.mark.slow
def test_evaluate_runs_against_the_server(server, data_dir):
    env = {**os.environ, "OPENAI_API_BASE": f"{server}/v1", "OPENAI_API_KEY": "local"}
    result = subprocess.run(
        [APEXDSP, "evaluate", "--program", "vanilla", "--limit", "2", "--lm", f"openai/{MODEL}",
         "--questions", str(data_dir / "hotpotqa" / "dev.jsonl"), "--no-track", "--json"],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lm"] == f"openai/{MODEL}" and summary["n"] == 2
    assert 0.0 <= summary["em"] <= 1.0
    assert summary["failures"] == 0 and summary["lm_calls"] >= 1


def test_a_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([APEXDSP, "serve", "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, f"port {port}", "in use")


def test_an_unknown_model_is_one_line_and_exit_2():
    result = subprocess.run([APEXDSP, "serve", "--lm", "no-such-model", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "no-such-model", MODEL)
