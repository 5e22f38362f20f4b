"""ColBERT retrieval for real: a tiny trained encoder, a real PLAID index on CPU, searched and evaluated.

One encoder (a few training steps on 24 HotpotQA training questions) and one index (the paragraphs of
12 HotpotQA dev questions, about 120 passages) are built once for the module and shared by the tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from apexdsp.errors import ApexError, DataError
from apexdsp.indexes.encoder_training import EncoderTrainingConfig

pytestmark = pytest.mark.slow
APEXDSP = str(Path(sys.executable).parent / "apexdsp")

TINY = dict(steps=4, batch_size=4, train_layers=0, distractors_per_question=2, mined_per_question=1,
            heldout_questions=4, pca_sample=64, limit_per_file=24)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("indexes")


@pytest.fixture(scope="module")
def mlflow_uri(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def small_corpus(workdir, data_dir) -> Path:
    """The gold and distractor paragraphs of the first 12 HotpotQA dev questions."""
    seen, rows = set(), []
    with open(data_dir / "hotpotqa" / "dev.jsonl") as handle:
        questions = [json.loads(line) for _, line in zip(range(12), handle)]
    for question in questions:
        for paragraph in question["paragraphs"]:
            if (paragraph["title"], paragraph["text"]) not in seen:
                seen.add((paragraph["title"], paragraph["text"]))
                rows.append({"id": f"p{len(rows)}", "title": paragraph["title"], "text": paragraph["text"]})
    path = workdir / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (workdir / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


@pytest.fixture(scope="module")
def encoder(workdir, data_dir, mlflow_uri):
    from apexdsp.indexes.encoder_job import train_encoder

    return train_encoder([data_dir / "hotpotqa" / "train.jsonl"], workdir / "encoder", EncoderTrainingConfig(**TINY),
                         track=True, progress=False)


@pytest.fixture(scope="module")
def index(workdir, small_corpus, encoder) -> Path:
    """Built by the real console script: its stdout must hold the manifest JSON and nothing else."""
    result = subprocess.run([APEXDSP, "index", "build", "--corpus", str(small_corpus), "--encoder", str(encoder.path),
                             "--out", str(workdir / "index"), "--json"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout)  # colbert's prints and faiss's C++ k-means log went to stderr
    assert manifest["passages"] > 100 and "Clustering" in result.stderr
    return workdir / "index"


@pytest.fixture(scope="module")
def retriever(index):
    from apexdsp.indexes import load_retriever

    return load_retriever(index)


# -- encoder ---------------------------------------------------------------------------------------

def test_encoder_is_a_colbert_checkpoint_with_the_trained_projection(encoder):
    import torch
    from safetensors.torch import load_file

    from apexdsp.indexes.encoder import load_checkpoint

    saved = load_file(encoder.path / "model.safetensors")["linear.weight"]
    first, second = load_checkpoint(encoder.path), load_checkpoint(encoder.path)
    assert torch.equal(first.linear.weight, saved), "colbert loaded a fresh projection, not the trained one"
    texts = ["Who directed the film?", "The film was directed by a Canadian."]
    assert torch.equal(first.queryFromText(texts), second.queryFromText(texts))
    assert first.colbert_config.dim == 128 and first.colbert_config.query_maxlen == 48
    record = json.loads((encoder.path / "apexdsp-encoder.json").read_text())
    assert record["fingerprint"] == encoder.fingerprint and record["config"]["steps"] == TINY["steps"]
    assert record["timings"]["total_s"] > 0 and record["examples"] == 24


def test_training_is_logged_to_mlflow(encoder, mlflow_uri):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    run = client.search_runs([client.get_experiment_by_name("indexes").experiment_id],
                             filter_string="attributes.run_name = 'train-encoder-encoder'")[0]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [TINY["steps"]]  # logged every 5 steps and at the last one
    assert run.data.params["train_layers"] == "0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "encoder_training.json", "losses.json"} <= artifacts


def test_training_is_deterministic_under_a_seed(workdir, data_dir, encoder):
    from apexdsp.indexes.encoder_job import train_encoder

    again = train_encoder([data_dir / "hotpotqa" / "train.jsonl"], workdir / "encoder-again",
                          EncoderTrainingConfig(**TINY), track=False, progress=False)
    assert again.fingerprint == encoder.fingerprint


def test_pca_projection_ranks_better_than_a_random_one(data_dir):
    import torch

    from apexdsp.indexes.encoder_training import EncoderTrainer
    from apexdsp.indexes.triples import build_examples

    examples = build_examples([data_dir / "hotpotqa" / "train.jsonl"], mined_per_question=0,
                              distractors_per_question=4, limit_per_file=30)
    trainer = EncoderTrainer(EncoderTrainingConfig(heldout_questions=30, pca_sample=128, train_layers=0), examples)
    trainer.heldout = trainer.heldout + trainer.train_examples  # rank all 30 questions' pools
    trainer.prepare()
    torch.manual_seed(0)
    torch.nn.init.normal_(trainer.model.linear.weight, std=0.05)
    random_mrr = trainer.evaluate()["heldout_mrr"]
    trainer.init_projection()
    assert trainer.evaluate()["heldout_mrr"] > random_mrr + 0.02  # measured: 0.854 vs 0.798 (seeded)


# -- build and search --------------------------------------------------------------------------------

def test_build_writes_manifest_passage_table_and_colbert_files(index, small_corpus, encoder):
    from apexdsp.data.loaders import file_sha256
    from apexdsp.indexes.manifest import IndexManifest

    manifest = IndexManifest.read(index)
    n = sum(1 for _ in open(small_corpus))
    assert manifest.passages == n and manifest.nbits == 2 and manifest.dim == 128
    assert manifest.corpus_sha256 == file_sha256(small_corpus)
    assert manifest.encoder_fingerprint == encoder.fingerprint
    assert manifest.build_seconds > 0 and manifest.index_bytes > 0
    assert sum(1 for _ in open(index / "passages.jsonl")) == n
    assert (index / "colbert" / "metadata.json").is_file() and (index / "colbert" / "ivf.pid.pt").is_file()
    assert not list(index.parent.glob("index.tmp-*")), "staging folder left behind"


def test_search_finds_the_passage_of_an_easy_query(retriever, small_corpus):
    rows = [json.loads(line) for line in open(small_corpus)]
    hits = retriever.search(f"{rows[5]['title']}: {rows[5]['text'][:80]}", k=3)
    assert hits[0].pid == rows[5]["id"] and hits[0].title == rows[5]["title"] and hits[0].text == rows[5]["text"]
    assert [h.rank for h in hits] == [1, 2, 3]
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_retriever_is_callable_with_one_query_or_a_batch(retriever):
    from apexdsp.indexes.base import Retriever

    assert isinstance(retriever, Retriever)
    single = retriever("Which country is the director from?", k=4)
    batch = retriever(["Which country is the director from?", "When was the band formed?"], k=4)
    assert len(batch) == 2 and [h.pid for h in batch[0]] == [h.pid for h in single]
    # k beyond the corpus: no error, distinct passages (PLAID returns the candidates its centroids reach)
    everything = retriever.search("a film", k=10_000)
    assert len(retriever.corpus) // 2 < len(everything) <= len(retriever.corpus)
    assert len({h.pid for h in everything}) == len(everything)


def test_load_retriever_shares_one_instance(index, retriever):
    from apexdsp.indexes import load_retriever

    assert load_retriever(index) is retriever
    assert load_retriever(str(index) + "/") is retriever


def test_concurrent_searches_from_many_threads(retriever):
    """Programs evaluate questions in threads that share one retriever; its tokenizer must not be raced."""
    from concurrent.futures import ThreadPoolExecutor

    queries = [f"which film was directed by the person number {i} in the list" for i in range(24)]
    expected = {q: [h.pid for h in retriever.search(q, k=3)] for q in queries}
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda q: [h.pid for h in retriever.search(q, k=3)], queries * 2))
    assert got == [expected[q] for q in queries * 2]


def test_empty_and_overlong_queries(retriever):
    from apexdsp.indexes.colbert_retriever import QueryTruncatedWarning

    for bad in ["", "   "]:
        with pytest.raises(ApexError, match="empty query"):
            retriever.search(bad)
    with pytest.raises(ApexError, match="empty query"):
        retriever.search_batch(["fine", ""])
    with pytest.raises(ApexError, match="k must be"):
        retriever.search("fine", k=0)
    long_query = "Which film directed by a Canadian " + "and produced in Hollywood " * 20
    with pytest.warns(QueryTruncatedWarning, match="truncated"):
        hits = retriever.search(long_query, k=2)
    assert len(hits) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", QueryTruncatedWarning)
        retriever.search("a short question", k=1)


def test_negatives_mined_with_an_index_are_never_gold(retriever, workdir):
    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes.triples import example_from_question, mine_negatives
    from apexdsp.metrics.retrieval import normalize_title

    examples = [example_from_question(q, 2) for q in read_questions(workdir / "questions.jsonl")]
    mine_negatives(examples, retriever, per_question=3, pool="colbert", depth=10)
    for example in examples:
        mined = example.pools["colbert"]
        assert len(mined) == 3 and not {normalize_title(p.title) for p in mined} & example.gold_titles
        assert not {p.encoded_text for p in mined} & {p.encoded_text for p in example.pools["distractors"]}


# -- bad indexes -------------------------------------------------------------------------------------

def test_missing_and_half_written_index(tmp_path, index):
    from apexdsp.indexes.colbert_retriever import ColBERTRetriever

    with pytest.raises(ApexError, match="not found"):
        ColBERTRetriever(tmp_path / "nope")
    half = tmp_path / "half"
    shutil.copytree(index, half)
    (half / "apexdsp-index.json").unlink()
    with pytest.raises(ApexError, match="did not finish"):
        ColBERTRetriever(half)
    broken = tmp_path / "broken"
    shutil.copytree(index, broken)
    (broken / "colbert" / "metadata.json").unlink()
    with pytest.raises(ApexError, match="incomplete"):
        ColBERTRetriever(broken)


def test_index_from_another_encoder_or_corpus_is_refused(tmp_path, index, encoder, small_corpus):
    from safetensors.torch import load_file, save_file

    from apexdsp.indexes.colbert_retriever import ColBERTRetriever

    other = tmp_path / "other-encoder"
    shutil.copytree(encoder.path, other)
    weights = load_file(other / "model.safetensors")
    weights["linear.weight"] = weights["linear.weight"] * 2
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ApexError, match="fingerprint"):
        ColBERTRetriever(index, encoder=other)
    changed = tmp_path / "corpus.jsonl"
    changed.write_text(small_corpus.read_text() + json.dumps({"id": "new", "title": "T", "text": "x"}) + "\n")
    with pytest.raises(ApexError, match="rebuild the index for this corpus"):
        ColBERTRetriever(index, corpus=changed)


def test_interrupted_build_leaves_the_earlier_index_intact(tmp_path, index, encoder, small_corpus, monkeypatch):
    from apexdsp.indexes import colbert_index

    target = tmp_path / "index"
    shutil.copytree(index, target)
    before = (target / "apexdsp-index.json").read_text()

    def interrupted(texts, encoder, index_path, nbits, verbose=1, partitions=None):
        index_path.mkdir(parents=True)
        (index_path / "0.codes.pt").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(colbert_index, "run_colbert_indexer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        colbert_index.build_index(small_corpus, encoder.path, target)
    assert (target / "apexdsp-index.json").read_text() == before
    assert not (target / "colbert" / "0.codes.pt").read_bytes() == b"partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"], "staging folder left behind"


# -- evaluation and the command line -----------------------------------------------------------------

def test_eval_compares_colbert_bm25_and_dense_and_logs_to_mlflow(index, workdir, isolated_mlflow):
    import mlflow

    from apexdsp.indexes.evaluation import evaluate_retrieval

    report = evaluate_retrieval(index, workdir / "questions.jsonl", ks=(1, 5, 20), progress=False)
    assert set(report.retrievers) == {"colbert", "bm25", "dense-minilm", "hybrid"} and report.n_questions == 12
    for scores in report.retrievers.values():
        assert 0 <= scores.recall_at[1] <= scores.recall_at[5] <= scores.recall_at[20] <= 1
        assert scores.all_gold_at[20] <= scores.recall_at[20] and 0 < scores.mrr <= 1
        assert scores.latency_ms_p50 > 0 and scores.latency_ms_p95 >= scores.latency_ms_p50
    # ~120 passages, every gold paragraph among them: any working retriever finds most gold in its top 20.
    assert report.retrievers["colbert"].recall_at[20] >= 0.8
    client = mlflow.MlflowClient(tracking_uri=isolated_mlflow)
    runs = client.search_runs([client.get_experiment_by_name("indexes").experiment_id],
                              filter_string="attributes.run_name LIKE 'eval-%'")
    assert runs and runs[0].data.metrics["colbert.recall_at_5"] == report.retrievers["colbert"].recall_at[5]


def test_hybrid_fuses_the_rankings_of_its_retrievers(index, workdir):
    from apexdsp.indexes import load_retriever
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.indexes.hybrid import HybridRetriever
    from apexdsp.indexes.manifest import IndexManifest

    colbert = load_retriever(index)
    bm25 = BM25Retriever(load_corpus(IndexManifest.read(index).corpus_path))
    query = "Who directed the film?"
    only_bm25 = HybridRetriever([colbert, bm25], weights=[0, 1], depth=10).search(query, k=5)
    assert [h.pid for h in only_bm25] == [h.pid for h in bm25.search(query, k=5)]  # weight 0: no say at all
    fused = HybridRetriever([colbert, bm25], depth=10).search_batch([query, "When was it released?"], k=5)
    assert [h.rank for h in fused[0]] == [1, 2, 3, 4, 5]
    assert all(a.score >= b.score for a, b in zip(fused[0], fused[0][1:]))
    tops = {h.pid for h in colbert.search(query, k=10)} | {h.pid for h in bm25.search(query, k=10)}
    assert {h.pid for h in fused[0]} <= tops
    both_first = colbert.search(query, k=1)[0].pid == bm25.search(query, k=1)[0].pid
    assert not both_first or fused[0][0].pid == bm25.search(query, k=1)[0].pid

    from apexdsp.errors import ApexError
    from apexdsp.indexes import open_retriever

    opened = open_retriever(index, "hybrid")
    assert isinstance(opened, HybridRetriever) and [h.pid for h in opened.search(query, k=5)] == [
        h.pid for h in HybridRetriever([colbert, bm25]).search(query, k=5)]
    assert [h.pid for h in open_retriever(index, "bm25").search(query, k=3)] == [h.pid for h in bm25.search(query, k=3)]
    with pytest.raises(ApexError, match="unknown retriever 'nope'"):
        open_retriever(index, "nope")


def test_cli_search_and_eval(index, workdir):
    from typer.testing import CliRunner

    from apexdsp.cli.index_cmd import app

    runner = CliRunner()
    result = runner.invoke(app, ["search", "--index", str(index), "Who directed the film?", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)  # stdout holds the JSON only
    assert [h["rank"] for h in hits] == [1, 2, 3] and {"pid", "title", "text", "score"} <= set(hits[0])
    result = runner.invoke(app, ["eval", "--index", str(index), "--questions", str(workdir / "questions.jsonl"),
                                 "-k", "1,5", "--no-baselines", "--no-track", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["retrievers"]) == ["colbert"] and set(summary["retrievers"]["colbert"]["recall_at"]) == {"1", "5"}


def test_cli_reports_bad_input_in_one_line(tmp_path, index, capsys):
    from apexdsp.cli.app import main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["index", "build", "--corpus", str(empty), "--encoder", str(tmp_path), "--out",
                 str(tmp_path / "i")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["index", "search", "--index", str(tmp_path / "nope"), "query"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["index", "search", "--index", str(index), "  "]) == 2
    assert "empty query" in capsys.readouterr().err
    assert main(["index", "eval", "--index", str(index), "--questions", str(empty), "-k", "0,5"]) == 2
    assert "positive integers" in capsys.readouterr().err
