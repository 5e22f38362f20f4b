"""Shared fixtures: a private MLflow store per test, the shared data folder, the environment defaults, and a
tiny random-init Llama for the tests that train or decode with a local model."""

from __future__ import annotations

import os

import pytest

from apexdsp.paths import configure_environment, shared_data_dir

configure_environment()


def _share_the_cores_between_workers() -> None:
    """Under ``pytest -n N`` each worker gets its share of the cores (and so do the commands tests start):
    N workers each running torch on every core would spin against each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Every test logs to its own sqlite store (artifacts beside it), never to the project's store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    """``apexdsp evaluate`` reports go to the test's folder, never to the project's ``.apexdsp/runs``."""
    folder = tmp_path / "runs"
    monkeypatch.setenv("APEXDSP_RUNS", str(folder))
    return folder


@pytest.fixture(scope="session")
def data_dir():
    """The offline benchmark copy (``../shared/data``)."""
    path = shared_data_dir()
    if not (path / "hotpotqa" / "dev.jsonl").exists():
        pytest.fail(f"shared data not found at {path}: CI expects ../shared beside the checkout")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init 2-layer Llama with SmolLM2-135M's tokenizer and chat template (seconds to train)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from apexdsp.lm.gguf_models import ensure_converted

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def paragraphs_index(data_dir):
    """A real BM25 index over the paragraphs of the first HotpotQA and MuSiQue training questions."""
    from apexdsp.data.loaders import read_questions
    from apexdsp.data.records import Passage
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    records = (read_questions(data_dir / "hotpotqa" / "train.jsonl")[:30]
               + read_questions(data_dir / "musique" / "train.jsonl")[:10])
    seen, passages = set(), []
    for record in records:
        for paragraph in record.paragraphs:
            if paragraph.title not in seen:
                seen.add(paragraph.title)
                passages.append(Passage(id=f"p{len(passages)}", title=paragraph.title, text=paragraph.text))
    return records, BM25Retriever(Corpus(passages))


@pytest.fixture
def engine_prompts(monkeypatch):
    """The prompt ids every local engine is sent during the test, in order (the real engine, recorded)."""
    from apexdsp.lm.engine import LocalEngine

    sent: list[list[int]] = []
    real = LocalEngine.prompt_ids

    def recording(self, request):
        ids, shared = real(self, request)
        sent.append(list(ids))
        return ids, shared

    monkeypatch.setattr(LocalEngine, "prompt_ids", recording)
    return sent


@pytest.fixture(scope="session")
def kill_table(tmp_path_factory):
    """The kill-and-rerun tests' table (kill_harness.KillTable), printed and written once the session ends."""
    from kill_harness import TABLE

    yield TABLE
    if TABLE.outcomes:
        paths = TABLE.write_all(tmp_path_factory.getbasetemp())
        print(f"\n{TABLE.render()}\n(written to {', '.join(map(str, paths))})")
