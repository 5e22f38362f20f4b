"""The quickstart experiment is written from the shared data and is a valid, runnable spec."""

from __future__ import annotations

import json

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Question
from apexdsp.experiments.quickstart import QuickstartSize, paragraph_corpus, write_quickstart
from apexdsp.experiments.runner import ExperimentRunner
from apexdsp.experiments.spec import load_spec


def test_paragraph_corpus_keeps_one_passage_per_title():
    questions = [Question(id="1", question="q1", answer="a",
                          paragraphs=[{"title": "A", "text": "a"}, {"title": "B", "text": "b"}]),
                 Question(id="2", question="q2", answer="c",
                          paragraphs=[{"title": "B", "text": "b again"}, {"title": "C", "text": "c"}])]
    rows = paragraph_corpus(questions)
    assert [row["title"] for row in rows] == ["A", "B", "C"]
    assert rows[1]["text"] == "b" and len({row["id"] for row in rows}) == 3


def test_quickstart_spec_is_valid_and_its_corpus_holds_every_gold_paragraph(tmp_path, data_dir):
    size = QuickstartSize(train=3, val=2, test=4, grpo_steps=1)
    spec_path = write_quickstart(tmp_path / "qs", data_dir, size)
    spec = load_spec(spec_path)
    assert spec.program.name == "apex"
    assert [stage.kind for stage in spec.optimizer.stages] == ["bootstrap", "sft", "grpo"]
    assert spec.optimizer.stages[2].settings["max_steps"] == 1
    titles = {json.loads(line)["title"] for line in (tmp_path / "qs" / "corpus.jsonl").read_text().splitlines()}
    test_questions = read_questions(data_dir / "hotpotqa" / "dev.jsonl", limit=4)
    assert all(set(q.supporting_titles) <= titles for q in test_questions)
    assert 9 * 10 >= len(titles) > 40  # the nine questions' paragraphs, deduplicated
    kinds = [step.kind for step in ExperimentRunner(spec, spec_path, cache_root=tmp_path / "cache").steps]
    assert kinds[:2] == ["encoder", "index"] and kinds.count("compile") == 3 and kinds.count("evaluate") == 4
