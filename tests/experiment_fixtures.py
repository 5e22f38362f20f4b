"""A tiny real experiment for the experiment tests: HotpotQA dev questions, their paragraphs as corpus."""

from __future__ import annotations

import json
from pathlib import Path

from apexdsp.experiments.quickstart import paragraph_corpus

TINY_SPEC = """
name = "{name}"
experiment = "{experiment}"

[data]
train = {{ file = "questions.jsonl", offset = 2, limit = 2 }}
test = {{ file = "questions.jsonl", limit = 2 }}

[index]
kind = "bm25"
corpus = "corpus.jsonl"

[program]
name = "rag"
[program.options]
answer_tokens = 12

[[optimizer.stages]]
kind = "labeled"
settings = {{ k = 2 }}

[evaluation]
metrics = ["em", "f1", "hit"]
threads = 4
"""


def write_tiny_experiment(folder: Path, data_dir: Path, name: str = "tiny-rag", experiment: str = "tiny",
                          extra: str = "") -> Path:
    """Four real questions (two to test, two to compile on), their 40 paragraphs as the corpus, a spec."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "hotpotqa" / "dev.jsonl") as handle:
        questions = [json.loads(line) for _, line in zip(range(4), handle)]
    rows = paragraph_corpus(questions)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    spec = folder / f"{name}.toml"
    spec.write_text(TINY_SPEC.format(name=name, experiment=experiment) + extra)
    return spec
