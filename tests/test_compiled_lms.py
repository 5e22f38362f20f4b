"""A compiled program owns its LMs: the manifest names each predictor's own LM (for trained weights, the model
they were trained from), ``load_compiled`` binds them, and ``apexdsp evaluate --compiled`` runs on them unless
``--lm`` is given. Real programs, two tiny random Llamas (one per seed) so that which LM answered shows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from apexdsp.data.loaders import read_questions
from apexdsp.data.records import Passage
from apexdsp.errors import ApexError
from apexdsp.lm.registry import get_lm
from apexdsp.optimizers.compiled import MANIFEST_FILE, STATE_FILE, load_compiled, read_manifest, save_compiled
from apexdsp.optimizers.trained_lm import TRAINED_MANIFEST
from apexdsp.programs.registry import build_program

APEXDSP = str(Path(sys.executable).parent / "apexdsp")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A second tiny random Llama: the tiny model's tokenizer, other weights. Its output layer is its own (the
    tiny model's, tied to its input embeddings, repeats the prompt's last token), so the two answer apart."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other-llama")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)  # the tokenizer and chat template
    torch.manual_seed(1)
    config = LlamaConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder.resolve()


@pytest.fixture(scope="module")
def retriever():
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus

    return BM25Retriever(Corpus(passages=[
        Passage(id="p0", title="Jaws (film)", text="Jaws is a 1975 film directed by Steven Spielberg.")]))


def lm_folder(predictor) -> Path | None:
    return None if predictor.lm is None else Path(predictor.lm.engine.model_dir).resolve()


def test_the_manifest_records_each_predictors_own_lm_and_loading_binds_it(tmp_path, retriever, tiny_model_dir,
                                                                          other_model_dir):
    # answer_step.generate runs on weights "trained" from the other model (a finished trained folder)
    trained = tmp_path / "trained"
    shutil.copytree(other_model_dir, trained)
    (trained / TRAINED_MANIFEST).write_text(json.dumps({"kind": "sft", "base_model": str(other_model_dir)}))
    program = build_program("apex", retriever=retriever, max_steps=2)
    program.planner.write_plan.lm = get_lm(str(other_model_dir))
    program.answer_step.generate.lm = get_lm(str(trained))
    out = tmp_path / "compiled"
    save_compiled(program, out, lm=str(tiny_model_dir))

    manifest = read_manifest(out)
    assert manifest.lm == str(tiny_model_dir)
    assert manifest.own_lms() == {"planner.write_plan": str(other_model_dir),
                                  "answer_step.generate": str(other_model_dir)}
    assert manifest.modules["answer_step.generate"].weights == "weights/answer_step.generate"
    assert all(binding.lm == str(tiny_model_dir) for name, binding in manifest.modules.items()
               if name not in manifest.own_lms())
    state = json.loads((out / STATE_FILE).read_text())
    assert all(value["lm"] is None for key, value in state.items() if key != "metadata")  # no machine's paths

    loaded = load_compiled(out, retriever=retriever).program
    assert lm_folder(loaded.planner.write_plan) == other_model_dir
    assert lm_folder(loaded.answer_step.generate) == (out / "weights" / "answer_step.generate").resolve()
    assert loaded.executor.analyze.lm is None  # the compile's default: the LM the caller configures

    configured = load_compiled(out, retriever=retriever, own_lms=False).program  # what `evaluate --lm` asks for
    assert configured.planner.write_plan.lm is None
    assert lm_folder(configured.answer_step.generate) == (out / "weights" / "answer_step.generate").resolve()

    # Plain DSPy reads the same state: the prompts and demos, and no LM
    plain = build_program("apex", retriever=retriever, max_steps=2)
    plain.load(str(out / STATE_FILE))
    assert plain.planner.write_plan.lm is None and plain.answer_step.generate.lm is None


def test_a_manifest_that_names_one_lm_for_all_still_loads(tmp_path, retriever, tiny_model_dir, other_model_dir):
    """Manifests written before predictors' own LMs were recorded name the default for every predictor."""
    program = build_program("apex", retriever=retriever, max_steps=2)
    program.planner.write_plan.lm = get_lm(str(other_model_dir))
    out = tmp_path / "compiled"
    save_compiled(program, out, lm="smollm2-135m")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for binding in manifest["modules"].values():
        binding["lm"] = manifest["lm"]
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert read_manifest(out).own_lms() == {}
    loaded = load_compiled(out, retriever=retriever).program
    assert all(predictor.lm is None for _, predictor in loaded.named_predictors())


def test_an_own_lm_that_cannot_be_loaded_is_one_line_naming_the_module(tmp_path, retriever, other_model_dir):
    program = build_program("apex", retriever=retriever, max_steps=2)
    program.planner.write_plan.lm = get_lm(str(other_model_dir))
    out = tmp_path / "compiled"
    save_compiled(program, out, lm="smollm2-135m")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["modules"]["planner.write_plan"]["lm"] = str(tmp_path / "gone")
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ApexError, match="module planner.write_plan runs on .*gone") as error:
        load_compiled(out, retriever=retriever)
    assert "\n" not in str(error.value)


def answers(compiled: Path, model: Path, questions: list[str]) -> list[str]:
    """What the compiled program answers here on ``model``, one question at a time (as --threads 1)."""
    from apexdsp.lm.adapter import TolerantChatAdapter

    program = load_compiled(compiled).program
    with dspy.context(lm=get_lm(str(model), cache=False), adapter=TolerantChatAdapter()):
        return [str(program(question=q).answer or "") for q in questions]


def evaluate(compiled: Path, questions: Path, *extra: str) -> dict:
    result = subprocess.run([APEXDSP, "evaluate", "--compiled", str(compiled), "--questions", str(questions),
                             "--limit", "2", "--threads", "1", "--no-track", "--json", *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    results = json.loads(Path(summary["results_file"]).read_text())["results"]
    summary["predictions"] = [row["prediction"] for row in results]
    return summary


def test_evaluate_compiled_runs_on_the_manifests_lm_unless_lm_is_given(tmp_path, data_dir, tiny_model_dir,
                                                                       other_model_dir):
    """The compiled program names the tiny model, not the command's default (smollm2-135m)."""
    program = build_program("vanilla", max_tokens=6)
    out = tmp_path / "compiled"
    save_compiled(program, out, lm=str(tiny_model_dir))
    questions = data_dir / "hotpotqa" / "dev.jsonl"
    asked = [q.question for q in read_questions(questions, limit=2)]
    on_tiny, on_other = answers(out, tiny_model_dir, asked), answers(out, other_model_dir, asked)
    assert on_tiny != on_other  # the two models tell apart which one answered

    by_manifest = evaluate(out, questions)
    assert by_manifest["lm"] == str(tiny_model_dir)
    assert by_manifest["predictions"] == on_tiny

    by_flag = evaluate(out, questions, "--lm", str(other_model_dir))
    assert by_flag["lm"] == str(other_model_dir)
    assert by_flag["predictions"] == on_other
