"""``apexdsp evaluate``: run a program on questions, print EM/F1/Hit/recall/cost, log the run to MLflow."""

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

from apexdsp.errors import ApexError
from apexdsp.lm import TIME_SHARES

console = Console()


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` to the root command."""
    app.command("evaluate")(evaluate)


def evaluate(
    program: Annotated[str, typer.Option(help="Program name: vanilla, rag, apex, opera, qagent.")] = "vanilla",
    questions: Annotated[Path, typer.Option(help="Questions JSONL (shared data format).")] = Path(
        "../shared/data/hotpotqa/dev.jsonl"),
    index: Annotated[Optional[Path], typer.Option(help="ColBERT index directory (programs that search).")] = None,
    retriever: Annotated[str, typer.Option(help=(
        "What searches the index's passages: hybrid (ColBERT and BM25 fused by rank), colbert, bm25 or dense."))
    ] = "hybrid",
    lm: Annotated[Optional[str], typer.Option(help=(
        "LM name (smollm2-135m, a local folder, or provider/model) for every module without trained weights. "
        "Default: smollm2-135m, or with --compiled the LMs the program was compiled with."))] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N questions.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Concurrent questions (the LM batches them).")] = 8,
    cache: Annotated[bool, typer.Option(help="Use DSPy's LM cache (off: timings are real).")] = False,
    track: Annotated[bool, typer.Option(help="Log the run to MLflow.")] = True,
    trace: Annotated[bool, typer.Option(help="Also record MLflow traces of every module and LM call.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    compiled: Annotated[Optional[Path], typer.Option(
        help="A compiled program (apexdsp compile --out DIR): its program, and its index unless --index.")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", help="Program option KEY=VALUE, repeatable (e.g. frozen_generator=smollm2-135m).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help=(
        "A progress file (JSONL): finished questions are appended to it, and a rerun with the same file "
        "runs only the ones it lacks. It records the program, compiled state, LM, index, question file "
        "and options; a run that differs in any of them is refused."))] = None,
) -> None:
    """Evaluate a program on a question file."""
    from apexdsp.cli.inputs import optional_retriever, program_options, require_questions
    from apexdsp.evaluation import evaluate_program
    from apexdsp.lm.registry import DEFAULT_MODEL
    from apexdsp.paths import runs_dir
    from apexdsp.programs.registry import RETRIEVAL_FREE, build_program
    from apexdsp.runtime import configure_dspy
    from apexdsp.tracking import write_json_atomic

    options = program_options(option)
    if compiled is not None and options:
        raise ApexError(f"--option with --compiled: {compiled} already fixes the program's options")
    own_lms: dict[str, str] = {}  # the compiled program's predictors that run on an LM of their own
    if compiled is not None:
        from apexdsp.optimizers.compiled import read_manifest

        manifest = read_manifest(compiled)
        program = manifest.program
        options = dict(manifest.program_options)
        index = index or (Path(manifest.index.path) if manifest.index else None)
        own_lms = manifest.own_lms() if lm is None else {}
        lm = lm or manifest.lm
    lm = lm or DEFAULT_MODEL
    records = require_questions(questions, limit)
    from apexdsp.indexes.hybrid import SEARCHERS

    if retriever not in SEARCHERS:
        raise ApexError(f"--retriever {retriever!r}: choose one of {', '.join(SEARCHERS)}")
    searched = {"retriever": retriever} if index is not None else {}  # what searched, when anything did
    progress_file = None
    if resume is not None:  # checked (and its header written) before any model or index is loaded
        from apexdsp.eval_checkpoint import EvalCheckpoint, run_provenance

        provenance = run_provenance(program=program, lm=lm, questions=questions, index=index,
                                    compiled=compiled, options={**options, **searched})
        progress_file = EvalCheckpoint(resume, provenance, label="--resume")
    searcher = optional_retriever(index, retriever)
    if compiled is not None:
        from apexdsp.optimizers.compiled import load_compiled

        qa = load_compiled(compiled, retriever=searcher, own_lms=bool(own_lms)).program
    else:
        qa = build_program(program, retriever=searcher, **options)  # checks the name and that searching programs have an index
    configure_dspy(lm=lm, cache=cache)
    if trace:
        from apexdsp.tracking import enable_dspy_tracing
        from apexdsp.tracking.evaluation_log import EVALUATION_EXPERIMENT

        enable_dspy_tracing(EVALUATION_EXPERIMENT)
    # DSPy's progress bar writes to stdout; send it to stderr so that --json output stays one clean line.
    with contextlib.redirect_stdout(sys.stderr):
        report = evaluate_program(qa, records, threads=threads, retrieves=program not in RETRIEVAL_FREE,
                                  progress=True, checkpoint=progress_file)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    local = write_json_atomic(report.model_dump(), runs_dir() / f"evaluate-{program}-{stamp}.json")
    summary = {"program": program, "lm": lm, **({"lm_modules": own_lms} if own_lms else {}), **report.summary(),
               "results_file": str(local)}
    if track:
        from apexdsp.tracking.evaluation_log import log_evaluation

        params = {"program": program, "lm": lm, "index": str(index) if index else "", "retriever": retriever,
                  "limit": limit or "",
                  "threads": threads, "n": report.n, "cache": cache,
                  "compiled": str(compiled or ""), "resumed_from": str(resume or ""),
                  **({"lm_modules": json.dumps(own_lms, sort_keys=True)} if own_lms else {})}
        summary["mlflow_run_id"] = log_evaluation(report, params, {"questions": questions},
                                                  run_name=f"{program}-{Path(questions).stem}-{report.n}")
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"{program} on {questions} ({report.n} questions)")
    for key in ("em", "f1", "hit", "recall", "lm_calls", "tokens", "seconds_per_question", "failures",
                "parse_failures", "plan_fallback_rate", "plan_repair_rate", *TIME_SHARES):
        value = summary.get(key)
        if value is not None:
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"results: {local}" + (f"   MLflow run: {summary['mlflow_run_id']}" if track else ""))
