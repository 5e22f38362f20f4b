"""A tiny real experiment for the experiment tests: HotpotQA dev questions, their paragraphs as corpus."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from apexdsp.data.loaders import read_questions
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
        (folder / "questions.jsonl").write_text("".join(itertools.islice(handle, 4)))
    rows = paragraph_corpus(read_questions(folder / "questions.jsonl"))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = folder / f"{name}.toml"
    spec.write_text(TINY_SPEC.format(name=name, experiment=experiment) + extra)
    return spec


# A spec tail (format with the model folder) that adds an SFT stage of the reader, evaluated after it.
SFT_STAGE = """after = ["labeled+sft"]

[lm]
default = "{model}"

[[optimizer.stages]]
kind = "sft"
[optimizer.stages.settings]
modules = ["reader.generate"]
max_steps = 2
batch_size = 2
train_layers = 1
learning_rate = 1e-3
"""
