"""docs/guide.md, run as written: every code block, in order, in a folder with the files the guide names.

The Python blocks share one namespace (as in a notebook); the TOML block is written to ``guide-rag.toml``
and run with ``apexdsp run`` before the blocks after it. Real parts throughout: SmolLM2-135M, BM25 over
the real paragraphs of four HotpotQA training questions, TRL's GRPOTrainer, a private MLflow store.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from apexdsp.cli.app import main
from apexdsp.data.loaders import read_questions
from apexdsp.experiments.quickstart import paragraph_corpus

pytestmark = pytest.mark.slow

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def guide_blocks() -> list[tuple[str, str]]:
    return [(match.group(1), match.group(2)) for match in BLOCK.finditer(GUIDE.read_text())]


def test_guide_has_the_blocks_this_test_runs():
    kinds = [kind for kind, _ in guide_blocks()]
    assert kinds.count("toml") == 1 and kinds.count("python") >= 6
    assert set(kinds) <= {"python", "toml"}  # a new kind of block needs a way to be run here


def test_every_block_of_the_guide_runs(tmp_path, data_dir, monkeypatch, capsys):
    source = data_dir / "hotpotqa" / "train.jsonl"
    with open(source) as handle:
        (tmp_path / "train.jsonl").write_text("".join(itertools.islice(handle, 4)))
    questions = read_questions(source, limit=4)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in paragraph_corpus(questions)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide"}
    for number, (kind, code) in enumerate(guide_blocks(), start=1):
        if kind == "toml":
            (tmp_path / "guide-rag.toml").write_text(code)
            status = main(["run", "guide-rag.toml", "--cache-dir", str(tmp_path / "cache")])
            assert status == 0, f"docs/guide.md block {number} (toml): apexdsp run exited with {status}"
            continue
        try:
            exec(compile(code, f"docs/guide.md block {number}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - name the block that broke
            pytest.fail(f"docs/guide.md block {number} raised {type(error).__name__}: {error}")
    printed = capsys.readouterr().out
    assert "decomposition" in printed  # the default reward of the planner
    assert "True" in printed  # the saved program carries the planner's GRPO weights
    assert (tmp_path / "compiled" / "plan-search-answer" / "apexdsp-compiled.json").is_file()
    table = namespace["table"]
    assert {row["stage"] for row in table["runs"]} >= {"uncompiled"} and len(table["runs"]) == 2
