"""The quickstart: a small real experiment, written out beside the step cache and run end to end.

It is the README's first command (``make quickstart`` → ``apexdsp quickstart``), sized to finish in about a
quarter of an hour on a 2-core CPU machine while still exercising every part of the compiler: a ColBERT
encoder trained for a few dozen steps, a real PLAID index, ``apex`` evaluated uncompiled, bootstrapped and
after a few GRPO steps on its planner, each step an MLflow child run, then the comparison table.

The corpus is a slice of the shared HotpotQA corpus: the paragraphs of the experiment's own questions
(each HotpotQA record carries its ten: the two gold ones and eight distractors). A slice keeps the index
build under a minute; the questions still have to be found among hundreds of passages, most of them
distractors chosen to look like the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Question
from apexdsp.tracking import write_text_atomic


@dataclass(frozen=True)
class QuickstartSize:
    """How many questions each split takes (HotpotQA train for compiling, dev for testing)."""

    train: int = 16
    val: int = 8
    val_offset: int = 1200
    test: int = 24
    grpo_steps: int = 2


SPEC = """\
# The quickstart experiment, written by `apexdsp quickstart` (edit and re-run with `apexdsp run` on this file).
name = "quickstart"
experiment = "quickstart"
description = "apex on a HotpotQA slice: uncompiled / bootstrap / +sft(executor.analyze) / +grpo(planner)"
seed = 0

[data]
train = {{ file = "hotpotqa/train.jsonl", limit = {size.train} }}
val = {{ file = "hotpotqa/train.jsonl", offset = {size.val_offset}, limit = {size.val} }}
test = {{ file = "hotpotqa/dev.jsonl", limit = {size.test} }}

[index]
kind = "colbert"
corpus = "corpus.jsonl"

[index.encoder]
train = ["hotpotqa/train.jsonl"]
limit = 100
steps = 60
batch_size = 16
heldout_questions = 32
pca_sample = 256

[program]
name = "apex"

[[optimizer.stages]]
kind = "bootstrap"
[optimizer.stages.settings]
num_candidates = 1
max_demos = 2

# APEX-Searcher's executor SFT: the analysis-answer step imitates calls rebuilt from the training questions'
# annotations over this index (answer shown in the passages), top 8 layers, bfloat16 math
[[optimizer.stages]]
kind = "sft"
[optimizer.stages.settings]
modules = ["executor.analyze"]
mixed_precision = "bf16"

[[optimizer.stages]]
kind = "grpo"
[optimizer.stages.settings]
module = "planner"
reward = "decomposition"
max_steps = {size.grpo_steps}
beta = 0.0  # no KL term, so no reference-model pass: a third faster per step on CPU
mixed_precision = "bf16"  # float32 weights, bfloat16 math: a quarter faster per step on this CPU
rollout_engine = "apexdsp"  # completions from the local engine's decoder: 30% less generation time per step

[evaluation]
metrics = ["em", "f1", "hit", "recall", "decomposition"]
threads = 16  # rows decoded together: a 16-row step is cheaper per token than an 8-row one (docs/notes/lm-engine.md)
"""


def question_slice(path: Path, offset: int, limit: int) -> list[Question]:
    """Questions ``offset .. offset + limit`` of a shared-format JSONL file."""
    return read_questions(path, limit=offset + limit)[offset:]


def paragraph_corpus(questions: Iterable[Question]) -> list[dict]:
    """The questions' own paragraphs as a corpus (shared corpus format), one passage per title."""
    seen: set[str] = set()
    rows = []
    for question in questions:
        for paragraph in question.paragraphs:
            if paragraph.title not in seen:
                seen.add(paragraph.title)
                rows.append({"id": f"p{len(rows)}", "title": paragraph.title, "text": paragraph.text})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_quickstart(folder: Path, data_dir: Path, size: QuickstartSize = QuickstartSize()) -> Path:
    """Write the quickstart's corpus slice and spec into ``folder``; returns the spec's path."""
    hotpotqa = data_dir / "hotpotqa"
    questions = (question_slice(hotpotqa / "train.jsonl", 0, size.train)
                 + question_slice(hotpotqa / "train.jsonl", size.val_offset, size.val)
                 + question_slice(hotpotqa / "dev.jsonl", 0, size.test))
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "corpus.jsonl", paragraph_corpus(questions))
    spec = folder / "quickstart.toml"
    write_text_atomic(spec, SPEC.format(size=size))
    return spec


__all__ = ["QuickstartSize", "paragraph_corpus", "question_slice", "write_quickstart"]
