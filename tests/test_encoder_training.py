"""Encoder training additions: the held-out slices, self-supervised pairs, the open-pool proxy, the distillation
teacher, best-step selection."""

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
    musique_questions = read_questions(data_dir / "musique" / "train.jsonl", limit=20)
    other = _examples(musique_questions, "musique")
    held, train = split_heldout(hotpot + other, 10, seed=0)
    held_again, _ = split_heldout(hotpot, 10, seed=0)
    hotpot_held = [e for e in held if e.source == "hotpot"]
    assert [e.question for e in hotpot_held] == [e.question for e in held_again]  # other files do not move it
    assert len(hotpot_held) == 10
    assert len([e for e in held if e.source == "musique"]) == 5  # every file gives a slice, at most a quarter
    assert not {e.question for e in held} & {e.question for e in train}
    assert len(train) == len(hotpot) + len(other) - 15
    _, proxy_held = heldout_split(questions, 10, seed=0)
    assert {q.question.strip() for q in proxy_held} == {e.question for e in hotpot_held}
    _, proxy_musique = heldout_split(musique_questions, 5, seed=0)
    assert {q.question.strip() for q in proxy_musique} == {e.question for e in held if e.source == "musique"}
    assert {e.question for e in split_heldout(hotpot, 10, seed=1)[0]} != {e.question for e in held}
    assert len(split_heldout(hotpot, 1000, seed=0)[0]) == len(hotpot) // 4  # never more than a quarter


def test_self_supervised_pairs_come_from_the_corpus_and_are_never_held_out(data_dir):
    from apexdsp.indexes.corpus import load_corpus
    from apexdsp.indexes.triples import build_examples, self_supervised_examples
    from apexdsp.metrics.retrieval import normalize_title

    corpus = load_corpus(data_dir / "musique" / "corpus.jsonl")
    texts = {p.title: p.text for p in corpus.passages}
    excluded = frozenset(normalize_title(p.title) for p in corpus.passages[:300])
    pairs = self_supervised_examples(corpus, 12, seed=0, exclude_titles=excluded)
    assert len(pairs) == 12 and all(e.self_supervised and not e.qid for e in pairs)
    assert not {t for e in pairs for t in e.gold_titles} & excluded
    assert len({e.positives[0].title for e in pairs}) == 12  # one pair per page
    titles = [e for e in pairs if e.question == e.positives[0].title.strip()]
    sentences = [e for e in pairs if e not in titles]
    assert titles and sentences
    for example in titles:
        assert example.positives[0].text == texts[example.positives[0].title]
    for example in sentences:  # the sentence is the query and is taken out of its passage
        whole = texts[example.positives[0].title]
        assert example.question in whole and example.question not in example.positives[0].text
        assert example.gold_titles == {normalize_title(example.positives[0].title)}

    train = data_dir / "musique" / "train.jsonl"
    examples = build_examples([train], mined_per_question=1, self_supervised_per_corpus=8, limit_per_file=20)
    synthetic = [e for e in examples if e.self_supervised]
    assert len(synthetic) == 8
    gold = {normalize_title(t) for q in read_questions(train, limit=20) for t in q.supporting_titles}
    assert not {t for e in synthetic for t in e.gold_titles} & gold  # no page a question of the file needs
    for example in synthetic:  # BM25 negatives, never of the pair's own page
        assert example.pools["bm25"] and all(normalize_title(n.title) not in example.gold_titles
                                             for n in example.pools["bm25"])
    held, _ = split_heldout(examples, 5, seed=0)
    assert len(held) == 5 and not any(e.self_supervised for e in held)


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


@pytest.mark.slow
def test_training_on_several_files_holds_out_a_slice_of_each_and_index_eval_can_score_it(tmp_path, data_dir):
    from apexdsp.errors import ApexError
    from apexdsp.indexes.encoder_job import train_encoder
    from apexdsp.indexes.evaluation import heldout_ids

    hotpot, musique = data_dir / "hotpotqa" / "train.jsonl", data_dir / "musique" / "train.jsonl"
    config = EncoderTrainingConfig(steps=2, batch_size=4, train_layers=0, distractors_per_question=2,
                                   mined_per_question=1, heldout_questions=6, heldout_random_passages=10,
                                   eval_every=2, pca_sample=64, limit_per_file=24, self_supervised_per_corpus=4)
    result = train_encoder([hotpot, musique], tmp_path / "enc", config, track=False, progress=False,
                           limits=[24, 16])
    record = result.record
    assert record["self_supervised_examples"] == 8 and record["heldout_questions"] == 6 + 4  # 16 // 4 of musique
    assert record["train_limits"] == [24, 16]
    after = record["heldout_after"]
    for name in ("recall_at_2", "recall_at_5", "mrr"):  # per file, and their mean
        assert after[f"heldout_{name}"] == pytest.approx(
            (after[f"heldout_hotpotqa_{name}"] + after[f"heldout_musique_{name}"]) / 2)
    held = heldout_ids(result.path, musique)
    trained_on = {q.id for q in read_questions(musique, limit=16)} - held
    assert len(held) == 4 and held <= {q.id for q in read_questions(musique, limit=16)} and trained_on
    assert len(heldout_ids(result.path, hotpot)) == 6
    with pytest.raises(ApexError, match="not one of its training files"):
        heldout_ids(result.path, data_dir / "2wikimultihopqa" / "train.jsonl")


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


def test_exhaustive_maxsim_equals_colberts_own_scoring():
    from colbert.modeling.colbert import colbert_score

    from apexdsp.indexes.heldout import maxsim_matrix

    generator = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(5, 32, 16, generator=generator), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(37, 40, 16, generator=generator), dim=-1)
    lengths = torch.randint(1, 41, (37,), generator=generator)
    mask = torch.arange(40)[None] < lengths[:, None]
    docs = docs * mask[..., None]
    ours = maxsim_matrix(queries, docs, mask, chunk=8)
    for row, query in enumerate(queries):
        theirs = colbert_score(query[None], docs, mask.float()).numpy()
        np.testing.assert_allclose(ours[row], theirs, rtol=1e-5, atol=1e-5)
