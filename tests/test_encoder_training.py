"""Encoder training additions: the held-out slice, the open-pool proxy, the distillation teacher, best-step selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apexdsp.data.loaders import read_questions
from apexdsp.indexes.corpus import Corpus
from apexdsp.indexes.distillation import Teacher, TeacherConfig, distillation_loss
from apexdsp.indexes.encoder_training import EncoderTrainingConfig, split_heldout
from apexdsp.indexes.heldout import OpenPool, build_open_pool, heldout_split, pool_metrics
from apexdsp.indexes.triples import example_from_question


@pytest.fixture(scope="module")
def questions(data_dir):
    return read_questions(data_dir / "hotpotqa" / "train.jsonl", limit=60)


def _examples(questions, source):
    examples = [example_from_question(q, 3) for q in questions]
    for example in examples:
        example.source = source
    return examples


def test_heldout_slice_is_stable_disjoint_and_shared_with_the_proxy(questions, data_dir):
    hotpot = _examples(questions, "hotpot")
    other = _examples(read_questions(data_dir / "musique" / "train.jsonl", limit=20), "musique")
    held, train = split_heldout(hotpot + other, 10, seed=0)
    held_again, _ = split_heldout(hotpot, 10, seed=0)
    assert [e.question for e in held] == [e.question for e in held_again]  # other files do not move it
    assert len(held) == 10 and {e.source for e in held} == {"hotpot"}
    assert not {e.question for e in held} & {e.question for e in train}
    assert len(train) == len(hotpot) + len(other) - 10
    _, proxy_held = heldout_split(questions, 10, seed=0)
    assert {q.question.strip() for q in proxy_held} == {e.question for e in held}
    assert {e.question for e in split_heldout(hotpot, 10, seed=1)[0]} != {e.question for e in held}
    assert len(split_heldout(hotpot, 1000, seed=0)[0]) == len(hotpot) // 4  # never more than a quarter


def test_open_pool_holds_the_questions_paragraphs_and_random_passages(questions):
    passages = {}
    for question in questions:
        for paragraph in question.paragraphs:
            passages.setdefault((paragraph.title, paragraph.text), None)
    from apexdsp.data.records import Passage

    corpus = Corpus([Passage(id=f"p{i}", title=t, text=x) for i, (t, x) in enumerate(passages)])
    pool = build_open_pool(questions[:5], corpus, random_passages=20, seed=0)
    own = {(p.title, p.text) for q in questions[:5] for p in q.paragraphs}
    assert own <= {(corpus[p].title, corpus[p].text) for p in pool.pids}
    assert len(pool.pids) == len(own) + 20 == len(set(pool.pids))


def test_pool_metrics_count_gold_titles_in_the_top_k(questions):
    from apexdsp.data.records import Passage

    question = questions[0]
    gold = question.supporting_titles
    corpus = Corpus([Passage(id="a", title=gold[0], text="x"), Passage(id="b", title="Other", text="y"),
                     Passage(id="c", title=gold[1], text="z")])
    pool = OpenPool(corpus=corpus, pids=[0, 1, 2], questions=[question])
    metrics = pool_metrics(np.array([[3.0, 2.0, 1.0]]), pool, ks=(1, 2, 3))
    assert metrics["recall@1"] == 0.5 and metrics["recall@2"] == 0.5 and metrics["recall@3"] == 1.0
    assert metrics["all_gold@2"] == 0.0 and metrics["all_gold@3"] == 1.0


def test_distillation_loss_is_zero_only_when_the_student_agrees():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(teacher + 5.0, teacher).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant
    student = torch.zeros(2, 3, requires_grad=True)
    loss = distillation_loss(student, teacher)
    loss.backward()
    assert loss.item() > 0.1
    assert student.grad[0, 0] < 0 < student.grad[0, 2]  # pushes up what the teacher prefers


@pytest.mark.slow
def test_teacher_prefers_the_matching_passage_and_masks_exclusions():
    questions = ["Which river flows through Paris?", "Who wrote the novel Moby-Dick?"]
    passages = ["Seine | The Seine is a river that flows through Paris, France.",
                "Herman Melville | Herman Melville was an American novelist, author of Moby-Dick.",
                "Photosynthesis | Plants convert light into chemical energy."]
    for bm25_weight in (0.0, 1.0):
        teacher = Teacher(questions, passages, TeacherConfig(bm25_weight=bm25_weight, temperature=0.5))
        excluded = torch.zeros(2, 3, dtype=torch.bool)
        logits = teacher.logits(questions, [0, 1, 2], excluded)
        assert logits.argmax(1).tolist() == [0, 1]
        excluded[0, 0] = True
        masked = teacher.logits(questions, [0, 1, 2], excluded)
        assert masked[0, 0] == -1e4 and masked[1].tolist() == pytest.approx(logits[1].tolist())
    reordered = teacher.logits(questions[::-1], [2, 1, 0], torch.zeros(2, 3, dtype=torch.bool))
    assert reordered[0].argmax().item() == 1 and reordered[1].argmax().item() == 2  # indexed by text and pid


@pytest.mark.slow
def test_training_with_distillation_keeps_the_best_checked_step(tmp_path, data_dir):
    from apexdsp.indexes.encoder_job import train_encoder

    config = EncoderTrainingConfig(steps=4, batch_size=4, train_layers=1, distractors_per_question=2,
                                   mined_per_question=1, heldout_questions=6, heldout_random_passages=20,
                                   eval_every=2, distill_weight=1.0, pca_sample=64, limit_per_file=24,
                                   lr_projection=5e-2)
    result = train_encoder([data_dir / "hotpotqa" / "train.jsonl"], tmp_path / "enc", config, track=False,
                           progress=False)
    selection = result.record["selection"]
    assert [point["step"] for point in selection["history"]] == [2, 4]
    best = max(selection["history"], key=lambda p: (p["heldout_recall_at_5"], p["heldout_mrr"]))
    assert selection["best_step"] == best["step"]
    assert result.record["heldout_after"] == {k: v for k, v in best.items() if k != "step"}  # best weights saved
    assert "teacher_s" in result.record["timings"]
    saved = json.loads((result.path / "apexdsp-encoder.json").read_text())
    assert saved["config"]["distill_weight"] == 1.0


def test_the_teacher_reuses_cached_corpus_vectors_and_never_encodes_a_whole_corpus(tmp_path, monkeypatch):
    """Only a corpus the dense baseline already encoded lends its vectors; an uncached one is skipped (the
    teacher encodes the few passages it trains on), so a short training run never waits on a whole corpus."""
    from apexdsp.indexes.baselines import DenseRetriever
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.indexes.distillation import corpus_embeddings

    monkeypatch.setenv("APEXDSP_HOME", str(tmp_path / "home"))
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": str(i), "title": f"T{i}", "text": f"passage number {i} about topic {i % 3}"} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert corpus_embeddings([str(path)]) == {}
    assert not list((tmp_path / "home").rglob("*.npy"))  # nothing was encoded or cached

    dense = DenseRetriever.build(load_corpus(path), tmp_path / "home" / "baselines")
    known = corpus_embeddings([str(path)])
    assert len(known) == 5
    for text, vector in zip(load_corpus(path).texts(), dense.embeddings):
        np.testing.assert_array_equal(known[text], vector)
