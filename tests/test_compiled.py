"""Compiled programs on disk: JSON state + manifest, atomic replacement, and clear errors for bad directories.

These tests need no LM: a compiled program here is a real apex/opera program with hand-written demos,
which is exactly what a compile saves. The round trip through a compile and a fresh process is in
tests/test_optimizers_bootstrap.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from apexdsp.data.records import Passage
from apexdsp.errors import ApexError
from apexdsp.optimizers.compiled import (MANIFEST_FILE, STATE_FILE, DataRef, load_compiled, read_manifest,
                                         save_compiled)
from apexdsp.programs.registry import build_program

APEXDSP = str(Path(sys.executable).parent / "apexdsp")


@pytest.fixture(scope="module")
def retriever():
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    return BM25Retriever(Corpus(passages=[
        Passage(id="p0", title="Jaws (film)", text="Jaws is a 1975 film directed by Steven Spielberg."),
        Passage(id="p1", title="Steven Spielberg", text="Steven Spielberg was born on December 18, 1946."),
    ]))


def apex_with_demos(retriever):
    program = build_program("apex", retriever=retriever, max_steps=2)
    program.planner.write_plan.demos = [dspy.Example(
        augmented=True, question="When was the director of Jaws born?",
        plan="1. Who directed Jaws?\n2. When was #1 born?")]
    program.answer_step.generate.demos = [dspy.Example(
        augmented=True, question="When was the director of Jaws born?", findings="- Who directed Jaws? -> Spielberg",
        passages="[1] Steven Spielberg: born December 18, 1946", answer="December 18, 1946")]
    return program


@pytest.fixture
def saved(tmp_path, retriever) -> Path:
    out = tmp_path / "compiled"
    save_compiled(apex_with_demos(retriever), out, lm="smollm2-135m",
                  data={"trainset": DataRef(path="train.jsonl", examples=2, sha256="ab" * 32)},
                  optimizer={"name": "bootstrap", "config": {"seed": 0}})
    return out


def test_save_writes_json_state_and_manifest_and_load_restores_demos(saved, retriever):
    assert sorted(p.name for p in saved.iterdir()) == [MANIFEST_FILE, STATE_FILE]
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    assert manifest["program"] == "apex" and manifest["program_options"] == {"max_steps": 2}
    assert manifest["modules"]["planner.write_plan"] == {"lm": "smollm2-135m", "weights": None}
    assert set(manifest["versions"]) == {"apexdsp", "dspy"} and manifest["data"]["trainset"]["examples"] == 2
    loaded = load_compiled(saved, retriever=retriever)
    program = loaded.program
    assert program.config.max_steps == 2 and program._compiled
    assert program.planner.write_plan.demos[0]["plan"] == "1. Who directed Jaws?\n2. When was #1 born?"
    assert program.answer_step.generate.demos[0]["answer"] == "December 18, 1946"
    assert not program.executor.analyze.demos
    assert not list(saved.parent.glob(".compiled.*")), "a temporary directory was left behind"


def test_saving_again_replaces_the_program_atomically(saved, retriever, monkeypatch):
    program = apex_with_demos(retriever)
    program.planner.write_plan.demos = []
    save_compiled(program, saved, lm="smollm2-135m")
    assert load_compiled(saved, retriever=retriever).program.planner.write_plan.demos == []

    def broken_save(path, *args, **kwargs):
        Path(path).write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr(program, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_compiled(program, saved, lm="smollm2-135m")
    assert load_compiled(saved, retriever=retriever).program.planner.write_plan.demos == []  # the good one stays
    assert sorted(p.name for p in saved.parent.iterdir()) == ["compiled"]


def test_a_save_clears_what_a_save_killed_between_its_two_renames_left(saved, retriever):
    """Killed between moving the earlier program aside and the new one in, a save leaves ``.NAME.old-<pid>``
    and ``.NAME.tmp-<pid>``; the next save clears both. A live process's staging folder is its own: kept."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    staging = saved.parent / f".compiled.tmp-{pid}"
    staging.mkdir()
    (staging / STATE_FILE).write_text("{half")
    saved.rename(saved.parent / f".compiled.old-{pid}")
    live = saved.parent / ".compiled.tmp-1"
    live.mkdir()
    program = apex_with_demos(retriever)
    program.planner.write_plan.demos = []
    save_compiled(program, saved, lm="smollm2-135m")
    assert sorted(p.name for p in saved.parent.iterdir()) == [".compiled.tmp-1", "compiled"]
    assert load_compiled(saved, retriever=retriever).program.planner.write_plan.demos == []


def test_save_refuses_to_replace_a_directory_that_is_not_a_compiled_program(tmp_path, retriever):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ApexError, match="not a compiled program"):
        save_compiled(apex_with_demos(retriever), precious, lm="smollm2-135m")
    assert (precious / "notes.txt").read_text() == "keep me"


def _edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest.update(changes)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda d: None, None),
    (lambda d: (d / MANIFEST_FILE).unlink(), "has no apexdsp-compiled.json"),
    (lambda d: (d / STATE_FILE).unlink(), "incomplete: missing program.json"),
    (lambda d: (d / MANIFEST_FILE).write_text("{not json"), "unreadable manifest"),
    (lambda d: _edit_manifest(d, format="apexdsp-compiled/99"), "format 'apexdsp-compiled/99'"),
    (lambda d: _edit_manifest(d, versions={"dspy": "2.0.0", "apexdsp": "0.1.0"}), "compiled with dspy 2.0.0"),
    (lambda d: _edit_manifest(d, modules={"planner.write_plan": {"lm": "x", "weights": "weights/planner"}}),
     "missing weights/planner"),
    (lambda d: (d / STATE_FILE).write_text("[1,"), "program.json: not valid JSON"),
])
def test_bad_compiled_directories_give_one_line_errors(saved, retriever, damage, message):
    damage(saved)
    if message is None:
        assert load_compiled(saved, retriever=retriever).manifest.program == "apex"
        return
    with pytest.raises(ApexError, match=message.replace("(", r"\(")) as error:
        load_compiled(saved, retriever=retriever)
    assert "\n" not in str(error.value)


def test_missing_directory(tmp_path):
    with pytest.raises(ApexError, match="not found"):
        read_manifest(tmp_path / "nowhere")


def test_module_names_that_do_not_match_the_saved_state(saved, retriever):
    opera = build_program("opera", retriever=retriever)  # apex's modules without the reflector
    with pytest.raises(ApexError, match=r"saved but not in the program: \['reflector.reflect'\]"):
        load_compiled(saved, program=opera)
    state = json.loads((saved / STATE_FILE).read_text())
    state["planner.plan_writer"] = state.pop("planner.write_plan")  # a renamed module
    (saved / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(ApexError, match="unreadable state: .*planner.plan_writer"):
        load_compiled(saved, retriever=retriever)


def test_a_custom_program_needs_its_instance_to_load(tmp_path, retriever):
    from apexdsp.programs.planner import Planner

    class PlanOnly(dspy.Module):
        def __init__(self):
            super().__init__()
            self.planner = Planner(max_steps=2)

        def forward(self, question):
            return self.planner(question=question)

    program = PlanOnly()
    program.planner.write_plan.demos = [dspy.Example(augmented=True, question="q?", plan="1. a b?")]
    manifest = save_compiled(program, tmp_path / "custom", lm="smollm2-135m")
    assert manifest.program.startswith("custom:") and manifest.program.endswith("PlanOnly")
    with pytest.raises(ApexError, match="pass a fresh instance of it as program="):
        load_compiled(tmp_path / "custom")
    loaded = load_compiled(tmp_path / "custom", program=PlanOnly()).program
    assert loaded.planner.write_plan.demos[0]["plan"] == "1. a b?"


def test_evaluate_cli_reports_a_bad_compiled_directory_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([APEXDSP, "evaluate", "--compiled", str(tmp_path / "empty"), "--limit", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "has no apexdsp-compiled.json" in result.stderr and "Traceback" not in result.stderr
