"""``apexdsp compile``: bootstrap a program's demos on training questions, then any weight stages, and save it.

Every compile is one MLflow run (``apexdsp-compile``) with a child run per stage: the bootstrap's, then the
schedule's, whose own children are its weight stages.

With ``--start-from DIR`` the bootstrap is skipped: the weight stages of ``--optimizer`` continue a program
compiled earlier (stage 2 on a saved stage-1 program, without bootstrapping it again).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from apexdsp.cli.inputs import optional_retriever, program_options, require_questions
from apexdsp.errors import ApexError
from apexdsp.tracking.run import COMPILE_EXPERIMENT

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    """Add ``compile`` to the root command."""
    app.command("compile")(compile_program)


def compile_program(
    program: Annotated[str, typer.Option(help="Program name: rag, apex, opera, qagent, vanilla.")] = "apex",
    optimizer: Annotated[str, typer.Option(help=(
        "Stages, '+'-separated: bootstrap, then calibrate or weight stages such as sft(reader.generate), "
        "sft(reader.decide,reader.choose) (several predictors on one LM), grpo(planner), "
        "grpo(executor.analyze:answer), or mapgrpo (the program's modules one after another); "
        "e.g. 'bootstrap+sft(executor.analyze)+grpo(planner)'."))] = "bootstrap",
    index: Annotated[Optional[Path], typer.Option(help="ColBERT index directory (programs that search).")] = None,
    retriever: Annotated[str, typer.Option(help=(
        "What searches the index's passages: hybrid (ColBERT and BM25 fused by rank), colbert, bm25 or dense."))
    ] = "hybrid",
    trainset: Annotated[Path, typer.Option(help="Training questions JSONL.")] = Path(
        "../shared/data/hotpotqa/train.jsonl"),
    valset: Annotated[Optional[Path], typer.Option(help="Validation questions JSONL (default: the trainset).")] = None,
    plan_demos: Annotated[Optional[Path], typer.Option(
        help="Questions with gold decompositions (e.g. MuSiQue train) whose plans may become planner demos.")] = None,
    out: Annotated[Path, typer.Option(help="Directory to write the compiled program to.")] = Path(
        ".apexdsp/compiled/program"),
    lm: Annotated[str, typer.Option(help="LM name for every module (and the teacher).")] = "smollm2-135m",
    limit_train: Annotated[Optional[int], typer.Option(min=1, help="Use the first N training questions.")] = None,
    limit_val: Annotated[Optional[int], typer.Option(min=1, help="Use the first N validation questions.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Concurrent questions (the LM batches them).")] = 8,
    candidates: Annotated[int, typer.Option(min=1, help="Candidate demo sets tried on the valset.")] = 3,
    max_demos: Annotated[int, typer.Option(min=0, help="Demos per predictor (the planner gets --max-plan-demos).")] = 2,
    max_plan_demos: Annotated[int, typer.Option(min=0, help="Demos for the planner.")] = 4,
    max_answer_demos: Annotated[Optional[int], typer.Option(min=0, help="Demos for the answer step (default --max-demos).")] = None,
    metric: Annotated[str, typer.Option(help="Selection metric: em, f1, hit, decomposition.")] = "em",
    min_answer_f1: Annotated[float, typer.Option(help="Trace gate: answer F1 at least this ...")] = 0.5,
    accept_hit: Annotated[bool, typer.Option(help="... or the gold answer is in the retrieved documents.")] = True,
    min_plan_reward: Annotated[float, typer.Option(help="Planner demos: decomposition reward at least.")] = 0.7,
    min_final_answer_f1: Annotated[float, typer.Option(help="Answer-step demos: answer F1 at least.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the candidate sampling.")] = 0,
    score_zero_shot: Annotated[bool, typer.Option(help="Also score the program without demos on the valset.")] = True,
    calibrate: Annotated[bool, typer.Option(help=(
        "After bootstrap, fit the yes/no and A/B steps' offsets on the trainset (also a stage of its own: "
        "--optimizer calibrate).")) ] = False,
    grpo_steps: Annotated[int, typer.Option(min=1, help="GRPO steps per weight stage.")] = 20,
    grpo_beta: Annotated[float, typer.Option(min=0, help="GRPO KL weight (0 skips the reference model).")] = 0.04,
    grpo_lr: Annotated[float, typer.Option(min=0, help="GRPO learning rate.")] = 1e-5,
    grpo_seed: Annotated[int, typer.Option(help="Seed of GRPO's sampling and data order.")] = 0,
    sft_source: Annotated[str, typer.Option(help=(
        "SFT examples: annotated (calls rebuilt from the trainset's annotations over the index), traces (the "
        "program's own successful runs) or annotated+traces."))] = "annotated",
    sft_epochs: Annotated[float, typer.Option(min=0.01, help="SFT epochs over the examples.")] = 1.0,
    sft_lr: Annotated[float, typer.Option(min=0, help="SFT learning rate.")] = 5e-5,
    sft_layers: Annotated[int, typer.Option(min=0, help="SFT trains the top N decoder layers (0: every weight).")] = 8,
    sft_max_examples: Annotated[Optional[int], typer.Option(min=1, help="SFT on at most N examples.")] = None,
    rollout_engine: Annotated[str, typer.Option(help=(
        "Who samples GRPO's completions: 'apexdsp' (the local engine's batching decoder: a prompt prefilled once "
        "for its group) or 'transformers' (TRL's model.generate)."))] = "apexdsp",
    mixed_precision: Annotated[str, typer.Option(help=(
        "Weight stages: 'bf16' (bfloat16 autocast over float32 weights; fast on CPUs with native bfloat16) "
        "or 'no'."))] = "no",
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", help="Program option KEY=VALUE, repeatable (e.g. frozen_generator=smollm2-135m).")] = None,
    start_from: Annotated[Optional[Path], typer.Option(help=(
        "A compiled program to continue (its own program; --program is not used): skip bootstrap, run only "
        "the later stages of --optimizer (calibrate, weight stages) "
        "(e.g. --optimizer 'grpo(planner)').")) ] = None,
    track: Annotated[bool, typer.Option(help="Log the compile to MLflow.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Compile a program: bootstrap reward-gated demos per module, pick a demo set on the valset, save it."""
    from apexdsp.data.loaders import read_questions
    from apexdsp.optimizers.bootstrap import RewardBootstrap
    from apexdsp.optimizers.compiled import DataRef, examples_digest, index_ref, save_compiled
    from apexdsp.optimizers.config import BootstrapConfig, DemoGates
    from apexdsp.programs.registry import build_program
    from apexdsp.runtime import configure_dspy

    from apexdsp.indexes.hybrid import SEARCHERS

    retriever_kind = retriever  # the option's value; ``retriever`` becomes the searcher object below
    if retriever_kind not in SEARCHERS:
        raise ApexError(f"--retriever {retriever_kind!r}: choose one of {', '.join(SEARCHERS)}")
    if not track:  # every stage, not only the summary run: nothing reaches MLflow
        from apexdsp.tracking import disable_tracking

        disable_tracking()
    sft = sft_config(source=sft_source, epochs=sft_epochs, lr=sft_lr, layers=sft_layers,
                     max_examples=sft_max_examples, mixed_precision=mixed_precision, seed=grpo_seed)
    if start_from is not None:
        _continue_compile(start_from, optimizer, out=out, trainset=trainset, limit_train=limit_train, index=index,
                          lm=lm, stages=weight_stages(optimizer, grpo_steps, grpo_beta, grpo_lr, start_from, grpo_seed,
                                                      sft=sft, mixed_precision=mixed_precision,
                                                      program=_compiled_program_name(start_from) if "mapgrpo" in optimizer else None,
                                                      rollout_engine=rollout_engine),
                          as_json=as_json, retriever_kind=retriever)
        return
    stages = weight_stages(optimizer, grpo_steps, grpo_beta, grpo_lr, seed=grpo_seed, sft=sft,
                           mixed_precision=mixed_precision, program=program, rollout_engine=rollout_engine)
    options = program_options(option)
    if not bootstraps_first(optimizer):  # weight stages on the uncompiled program
        retriever = optional_retriever(index, retriever_kind)
        student = build_program(program, retriever=retriever, **options)
        _train_weights(student, optimizer, out=out, trainset=trainset, limit_train=limit_train, index=index, lm=lm,
                       stages=stages, as_json=as_json, retriever=retriever)
        return
    try:
        config = BootstrapConfig(
            gates=DemoGates(min_answer_f1=min_answer_f1, accept_hit=accept_hit, min_plan_reward=min_plan_reward,
                            min_final_answer_f1=min_final_answer_f1),
            max_demos=max_demos, max_demos_by_signature=demo_budgets(max_plan_demos, max_answer_demos), num_candidates=candidates,
            metric=metric, seed=seed, threads=threads, score_zero_shot=score_zero_shot, calibrate_choices=calibrate)
    except ValueError as error:
        raise ApexError(f"bad compile option: {str(error).splitlines()[-1].strip()}") from None
    train = require_questions(trainset, limit_train)
    val = read_questions(valset, limit=limit_val) if valset else None
    labeled = read_questions(plan_demos) if plan_demos else []
    if plan_demos and not any(q.decomposition for q in labeled):
        raise ApexError(f"{plan_demos}: no question has a gold decomposition (field 'decomposition')")
    retriever = optional_retriever(index, retriever_kind)
    student = build_program(program, retriever=retriever, **options)
    _check_out(out)
    if stages:  # a stage naming a module the program lacks fails now, not after the bootstrap
        from apexdsp.optimizers.schedule import ProgressiveSchedule

        ProgressiveSchedule(stages, out, retriever=retriever).check(student)
    configure_dspy(lm=lm)
    # Finished phases are kept beside --out until the program is saved: a rerun after an interruption resumes.
    checkpoint = out.parent / f".{out.name}.checkpoint.json"
    teleprompter = RewardBootstrap(config, retriever=retriever, labeled_plans=labeled, checkpoint=checkpoint,
                                   hints="cli", experiment=COMPILE_EXPERIMENT)
    data = {"trainset": DataRef(path=str(trainset), examples=len(train), sha256=examples_digest(train))}
    if val:
        data["valset"] = DataRef(path=str(valset), examples=len(val), sha256=examples_digest(val))
    if labeled:
        data["plan_demos"] = DataRef(path=str(plan_demos), examples=len(labeled), sha256=examples_digest(labeled))
    params = {"program": program, "optimizer": optimizer, "lm": lm, "index": str(index or ""),
              "limit_train": limit_train or "", "limit_val": limit_val or "", "threads": threads}
    data_files = {"trainset": trainset, **({"valset": valset} if valset else {}),
                  **({"plan_demos": plan_demos} if plan_demos else {})}
    # One compile run: the bootstrap, then the schedule with its stages, are its children.
    with _compile_run(params, config, data_files) as run:
        started = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # DSPy's progress bars: keep --json output clean
            compiled = teleprompter.compile(student, trainset=train, valset=val)
        seconds = time.perf_counter() - started
        report = teleprompter.report
        optimizer_info = {"name": "bootstrap", "config": config.model_dump(), "seconds": seconds,
                          "report": report.model_dump()}
        save_compiled(compiled, out, lm=lm, index=index_ref(index), data=data, optimizer=optimizer_info)
        if stages:  # the bootstrapped program is saved first: a failed weight stage never loses it
            from apexdsp.optimizers.schedule import ProgressiveSchedule

            schedule = ProgressiveSchedule(stages, out.parent / f".{out.name}.stages", retriever=retriever,
                                           experiment=COMPILE_EXPERIMENT)
            with contextlib.redirect_stdout(sys.stderr):
                compiled = schedule.compile(compiled, trainset=train)
            seconds = time.perf_counter() - started
            optimizer_info.update(name=optimizer, seconds=seconds,
                                  stages=[_stage_summary(r) for r in schedule.results])
            save_compiled(compiled, out, lm=lm, index=index_ref(index), data=data, optimizer=optimizer_info)
        checkpoint.unlink(missing_ok=True)
        _log_compile(run, report, seconds, out, program)
    summary = {"program": program, "out": str(out), "compile_seconds": round(seconds, 1),
               "chosen": report.best()["label"], "val_" + metric: report.best()["metric"],
               "zero_shot_" + metric: next((c["metric"] for c in report.candidates if c["index"] == -1), None),
               "passed": report.passed, "demos": {d.predictor: d.chosen for d in report.demos if d.chosen},
               **({"mlflow_run_id": run.run_id} if run.run_id else {})}
    if as_json:
        print(json.dumps(summary, default=str))
        return
    _print(report, summary)


def _compile_run(params, config, data_files):
    """The compile's parent run (nothing is logged with ``--no-track``)."""
    from apexdsp.tracking import tracked_run

    return tracked_run(COMPILE_EXPERIMENT, run_name=f"{params['program']}-{params['optimizer']}",
                       tags={"apexdsp.kind": "compile"}, params={**params, **_flat(config.model_dump())},
                       data_files=data_files)


def _log_compile(run, report, seconds, out, program) -> None:
    """The compile's outcome in its parent run: its figures and the program (as files and as a model); the
    candidates, demos and bootstrap report are in the bootstrap's child run."""
    best = report.best()
    run.log_metrics({"compile_seconds": seconds, "bootstrap_seconds": report.bootstrap_seconds,
                     "selection_seconds": report.selection_seconds, "traces_passed": sum(report.passed.values()),
                     "traces_failed": report.failed, "train_em": report.train_em, "train_f1": report.train_f1,
                     "train_plan_reward": report.train_plan_reward,
                     **{f"best_{k}": best.get(k) for k in ("metric", "em", "f1", "hit", "decomposition")}})
    run.log_artifact(out, artifact_path="compiled")
    _log_model(out, program)


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "max_demos_by_signature":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _print(report, summary) -> None:
    table = Table(title=f"candidates on {report.val_examples} validation questions")
    for column in ("candidate", "demos", "metric", "EM", "F1", "decomposition", "copies", "seconds"):
        table.add_column(column)
    for c in report.candidates:
        chosen = " (chosen)" if c["index"] == report.chosen else ""
        table.add_row(c["label"] + chosen, str(sum(c["demos"].values())), f"{c['metric']:.3f}", f"{c['em']:.3f}",
                      f"{c['f1']:.3f}", "n/a" if c["decomposition"] is None else f"{c['decomposition']:.3f}",
                      f"{c.get('copy_rate', 0):.2f}", f"{c['seconds']:.0f}")
    out = Console()
    out.print(table)
    out.print(f"traces passed: {report.passed} of {report.train_examples}; demos: {summary['demos']}")
    out.print(f"saved: {summary['out']} ({summary['compile_seconds']} s)"
              + (f"   MLflow run: {summary['mlflow_run_id']}" if "mlflow_run_id" in summary else ""))


def demo_budgets(plan_demos: int, answer_demos: int | None) -> dict[str, int]:
    """Per-signature demo counts: the planner's, and the answer step's when it differs from the default."""
    budgets = {"WritePlan": plan_demos}
    if answer_demos is not None:
        # The yes/no steps keep the default (2: one "yes", one "no"); more would only lengthen their prompt.
        budgets.update({"AnswerFromFindings": answer_demos, "AnswerFromPassages": answer_demos})
    return budgets


def bootstraps_first(optimizer: str) -> bool:
    """Whether ``--optimizer`` opens with the prompt stage (``bootstrap+...``)."""
    return optimizer.split("+")[0].strip() == "bootstrap"


def sft_config(*, source: str, epochs: float, lr: float, layers: int, max_examples: int | None,
               mixed_precision: str, seed: int):
    """The SFT stages' settings from the command's options (a bad value is one line naming it)."""
    from apexdsp.optimizers.sft import SFTStageConfig

    return SFTStageConfig(source=source, num_train_epochs=epochs, learning_rate=lr, train_layers=layers or None,
                          max_examples=max_examples, mixed_precision=mixed_precision, seed=seed)  # type: ignore[arg-type]


def weight_stages(optimizer: str, grpo_steps: int, grpo_beta: float, grpo_lr: float = 1e-5,
                  start_from: Path | None = None, seed: int = 0, sft=None, mixed_precision: str = "no",
                  program: str | None = None, rollout_engine: str = "apexdsp") -> list:
    """The weight-training stages of ``--optimizer``: after ``bootstrap`` (none for plain ``bootstrap``),
    or all of it when continuing a compiled program (``start_from``), which must not bootstrap again."""
    from apexdsp.optimizers.grpo_config import ModuleGRPOConfig
    from apexdsp.optimizers.schedule import parse_stages

    parts = [p.strip() for p in optimizer.split("+") if p.strip()]
    config = ModuleGRPOConfig(max_steps=grpo_steps, beta=grpo_beta, learning_rate=grpo_lr, seed=seed,
                              mixed_precision=mixed_precision, rollout_engine=rollout_engine)  # type: ignore[arg-type]
    if start_from is not None:
        if "bootstrap" in parts:
            raise ApexError(f"--optimizer {optimizer!r} with --start-from: {start_from} is already compiled; "
                            "name only weight stages (e.g. 'grpo(planner)')")
        return parse_stages("+".join(parts), config, sft, program)
    if "bootstrap" in parts[1:]:
        raise ApexError(f"--optimizer {optimizer!r}: 'bootstrap' is the prompt stage and comes first "
                        "(e.g. 'bootstrap+grpo(planner)')")
    if not bootstraps_first(optimizer):  # weight stages only, on the uncompiled program
        return parse_stages("+".join(parts), config, sft, program)
    if len(parts) == 1:
        return []
    return parse_stages("+".join(parts[1:]), config, sft, program)


def _continue_compile(start_from: Path, optimizer: str, *, out: Path, trainset: Path, limit_train: int | None,
                      index: Path | None, lm: str, stages: list, as_json: bool, retriever_kind: str = "hybrid") -> None:
    """Run weight stages on a saved compiled program and save the result to ``out`` (never over it)."""
    from apexdsp.optimizers.compiled import load_compiled

    if out.expanduser().resolve() == start_from.expanduser().resolve():
        raise ApexError(f"--out {out} is --start-from: write the trained program elsewhere, so the stage-1 "
                        "program is kept whatever happens")
    retriever = optional_retriever(index, retriever_kind)
    loaded = load_compiled(start_from, retriever=retriever)
    _train_weights(loaded.program, optimizer, out=out, trainset=trainset, limit_train=limit_train, index=index,
                   lm=lm, stages=stages, as_json=as_json, retriever=retriever, start_from=start_from,
                   manifest=loaded.manifest)


def _train_weights(program, optimizer: str, *, out: Path, trainset: Path, limit_train: int | None,
                   index: Path | None, lm: str, stages: list, as_json: bool, retriever=None,
                   start_from: Path | None = None, manifest=None) -> None:
    """Run the weight stages on ``program`` (loaded from ``start_from``, or uncompiled) and save it to ``out``.

    ``retriever`` is the index the rewards search (the decomposition reward's executability needs it)."""
    from apexdsp.optimizers.compiled import DataRef, examples_digest, index_ref, save_compiled
    from apexdsp.optimizers.schedule import ProgressiveSchedule
    from apexdsp.runtime import configure_dspy

    train = require_questions(trainset, limit_train)
    _check_out(out)
    schedule = ProgressiveSchedule(stages, out.parent / f".{out.name}.stages", retriever=retriever,
                                   experiment=COMPILE_EXPERIMENT)
    schedule.check(program)
    from apexdsp.tracking import tracked_run

    configure_dspy(lm=lm)
    started = time.perf_counter()
    name = getattr(program, "name", "program")
    # One compile run; the schedule and its stages are its children; the result is logged as an MLflow model.
    with tracked_run(COMPILE_EXPERIMENT, run_name=f"{name}-{optimizer}", tags={"apexdsp.kind": "compile"},
                     params={"program": name, "optimizer": optimizer, "lm": lm, "index": str(index or ""),
                             "start_from": str(start_from or "uncompiled"), "limit_train": limit_train or ""},
                     data_files={"trainset": trainset}) as run:
        with contextlib.redirect_stdout(sys.stderr):
            compiled = schedule.compile(program, trainset=train)
        seconds = time.perf_counter() - started
        data = {**(manifest.data if manifest else {}),
                "weight_trainset": DataRef(path=str(trainset), examples=len(train), sha256=examples_digest(train))}
        optimizer_info = {"name": optimizer, "start_from": str(start_from or "uncompiled"), "seconds": seconds,
                          "previous": manifest.optimizer if manifest else {},
                          "stages": [_stage_summary(r) for r in schedule.results]}
        index_entry = index_ref(index) if index else (manifest.index if manifest else None)
        save_compiled(compiled, out, lm=lm, index=index_entry, data=data, optimizer=optimizer_info)
        run.log_metrics({"compile_seconds": seconds})
        model_uri = _log_model(out, name)
    summary = {"out": str(out), "start_from": str(start_from or "uncompiled"), "compile_seconds": round(seconds, 1),
               "stages": optimizer_info["stages"], **({"mlflow_run_id": run.run_id, "model_uri": model_uri}
                                                      if run.run_id else {})}
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        console.print(summary)


def _log_model(out: Path, program: str) -> str | None:
    """Log the compiled program as an MLflow model of the active run (registered as ``apexdsp-<program>``, a
    version per compile); ``None`` when tracking is off."""
    from apexdsp.optimizers.mlflow_model import log_compiled_model
    from apexdsp.tracking import tracking_enabled

    if not tracking_enabled():
        return None
    with contextlib.redirect_stdout(sys.stderr):
        return log_compiled_model(out, registered_model_name=f"apexdsp-{program}")


def _compiled_program_name(folder: Path) -> str:
    from apexdsp.optimizers.compiled import read_manifest

    return read_manifest(folder).program


def _check_out(out: Path) -> None:
    """``--out`` must be a folder that can be created and written, checked before any slow work."""
    import os

    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise ApexError(f"--out {out} is a file; give a folder for the compiled program")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ApexError(f"--out {out}: {parent} cannot be written; choose a folder you can write to")


def _stage_summary(result) -> dict:
    """What the manifest keeps of one stage (GRPO result, SFT examples or the choice calibration)."""
    from apexdsp.optimizers.calibration import CalibrationReport

    if isinstance(result, CalibrationReport):
        return {"kind": "calibrate", **result.model_dump()}
    if hasattr(result, "examples") and hasattr(result, "report"):  # a ModuleSFT
        return {"kind": "sft", "modules": list(result.modules), **result.report}
    return {"kind": "grpo", "module": result.module, "steps": result.steps, "seconds": round(result.seconds, 1),
            "reward_first": result.reward_first, "reward_last": result.reward_last, "timing": result.timing}
