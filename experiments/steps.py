"""The steps of an experiment (encoder, index, compile stages, evaluations), each keyed by what it is made of.

A step's key is a hash of its spec section, the hashes of the files it reads and the keys of the steps it
depends on, so an unchanged step is never recomputed, and a change anywhere upstream (a new corpus, an
extra demo) re-runs exactly the steps downstream of it. Results live in ``<cache>/<key>/``: the step's
artifacts first, then ``result.json``, written atomically and last, whose presence means "done".
Execution settings (threads, progress) are not part of a key: they do not change what is computed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apexdsp.errors import ApexError
from apexdsp.experiments.sources import file_hash, load_source, source_identity
from apexdsp.experiments.spec import ExperimentSpec, QuestionSource
from apexdsp.experiments.stages import STAGE_KINDS, StageContext, run_stage, stage_labels
from apexdsp.paths import recorded_path
from apexdsp.tracking.run import write_json_atomic

RESULT_FILE = "result.json"
STEP_FORMAT = 1  # bump when a step's outputs change meaning: every key changes with it


def content_key(kind: str, identity: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps({"format": STEP_FORMAT, "kind": kind, **identity}, sort_keys=True,
                                       default=str).encode()).hexdigest()
    return f"{kind}-{digest[:16]}"


@dataclass
class StepOutput:
    """What a step reports: params and figures for MLflow, artifacts (paths in its folder), curves."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class Step:
    """One unit of cached work. Subclasses give ``kind``, ``label``, ``identity()`` and ``run()``."""

    kind = "step"
    seconds_metric: str | None = None  # the metric that reports the step's active seconds (StepClock)

    def __init__(self, label: str, upstream: list[Step] | None = None):
        self.label = label
        self.upstream = upstream or []
        self._key: str | None = None

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def with_active_seconds(self, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        """The step's figures with its active seconds (StepClock: every attempt, pauses left out) put in."""
        return {**metrics, self.seconds_metric: seconds} if self.seconds_metric else metrics

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = content_key(self.kind, {**self.identity(), "upstream": [s.key for s in self.upstream]})
        return self._key

    def run(self, context: RunContext, work_dir: Path) -> StepOutput:
        raise NotImplementedError

    def progress(self, work_dir: Path) -> str | None:
        """How far an interrupted run of this step got, read from what it kept in ``work_dir``."""
        return None


class RunContext:
    """What steps share within one ``apexdsp run``: the spec, the step folders, the loaded index and LMs."""

    def __init__(self, spec: ExperimentSpec, cache_root: Path):
        self.spec = spec
        self.cache_root = cache_root
        self.index_dir: Path | None = None
        self._retriever: Any = None
        self._lm_ready = False

    def step_dir(self, step: Step) -> Path:
        return self.cache_root / step.key

    def retriever(self) -> Any:
        """The index the program searches, loaded once (None for retrieval-free programs)."""
        index = self.spec.index
        if index is None or self._retriever is not None:
            return self._retriever
        if index.kind == "bm25":
            from apexdsp.indexes.baselines import BM25Retriever
            from apexdsp.indexes.corpus import load_corpus

            self._retriever = BM25Retriever(load_corpus(index.corpus))
        else:
            from apexdsp.indexes import open_retriever

            self._retriever = open_retriever(index.reuse or self.index_dir, index.retriever)
        return self._retriever

    def configure_lm(self) -> None:
        if not self._lm_ready:
            from apexdsp.runtime import configure_dspy

            configure_dspy(self.spec.lm.default)
            self._lm_ready = True

    def build_program(self) -> Any:
        """The spec's program, uncompiled, with the per-module LMs of ``lm.modules``."""
        from apexdsp.lm.registry import get_lm
        from apexdsp.programs.registry import build_program

        self.configure_lm()
        program = build_program(self.spec.program.name, retriever=self.retriever(), **self.spec.program.options)
        for name, predictor in program.named_predictors():
            for key, lm in self.spec.lm.modules.items():
                if name == key or name.startswith(key + "."):
                    predictor.lm = get_lm(lm)
        return program


# -- saving compiled programs between steps ---------------------------------------------------------


def save_program(program: Any, folder: Path, context: RunContext, info: dict[str, Any]) -> None:
    """A compiled program directory (JSON state + manifest, and the weights a stage trained: see
    :func:`apexdsp.optimizers.compiled.save_compiled`)."""
    compiled = _compiled_api()
    spec = context.spec
    index = compiled.index_ref(context.index_dir) if spec.index and spec.index.kind == "colbert" else None
    if spec.index is not None and spec.index.reuse is not None:
        index = compiled.index_ref(spec.index.reuse)
    compiled.save_compiled(program, folder, lm=spec.lm.default, index=index, optimizer=info)


def load_program(context: RunContext, folder: Path | None) -> Any:
    """The spec's program with the state saved in ``folder`` (the uncompiled one when None).

    The spec's ``lm.modules`` apply to every predictor without trained weights of its own.
    """
    if folder is None:
        return context.build_program()
    fresh = context.build_program()  # the spec's program and per-module LMs, then the saved state into it
    spec_lms = {name: predictor.lm for name, predictor in fresh.named_predictors()}
    program = _compiled_api().load_compiled(folder, retriever=context.retriever(), program=fresh).program
    for name, predictor in program.named_predictors():
        if predictor.lm is None:  # no trained weights bound: the spec's LM
            predictor.lm = spec_lms.get(name)
    return program


def _compiled_api() -> Any:
    try:
        from apexdsp.optimizers import compiled
    except ImportError as error:
        raise ApexError(f"compile stages need apexdsp.optimizers.compiled, which cannot be imported "
                        f"({error})") from None
    return compiled


# -- the steps ---------------------------------------------------------------------------------------


class EncoderStep(Step):
    """Train the ColBERT encoder from question files (``[index.encoder] train = [...]``)."""

    kind = "encoder"

    def identity(self) -> dict[str, Any]:
        encoder = self.spec_encoder
        return {"settings": encoder.training_settings(), "limit": encoder.limit,
                "train": [file_hash(item.file) if item.limit is None else [file_hash(item.file), item.limit]
                          for item in encoder.train]}

    def __init__(self, spec: ExperimentSpec):
        super().__init__("encoder")
        self.spec_encoder = spec.index.encoder

    def run(self, context: RunContext, work_dir: Path) -> StepOutput:
        from apexdsp.indexes.encoder_job import train_encoder
        from apexdsp.indexes.encoder_training import EncoderTrainingConfig
        from apexdsp.paths import cache_dir

        encoder = self.spec_encoder
        config = EncoderTrainingConfig(**encoder.training_settings(), limit_per_file=encoder.limit)
        trained = train_encoder([str(item.file) for item in encoder.train], work_dir / "encoder", config,
                                track=False, cache_dir=cache_dir("cache"), limits=encoder.train_limits())
        record = trained.record
        metrics = {**{f"before_{k}": v for k, v in record["heldout_before"].items()},
                   **{f"after_{k}": v for k, v in record["heldout_after"].items()}, **record["timings"]}
        return StepOutput(params=config.as_params(), metrics=metrics, artifacts=["encoder/apexdsp-encoder.json"])


class IndexStep(Step):
    """Build a ColBERT (PLAID) index over the corpus with the encoder (trained upstream or given)."""

    kind = "index"

    def __init__(self, spec: ExperimentSpec, encoder_step: EncoderStep | None):
        super().__init__("index", [encoder_step] if encoder_step else [])
        self.index = spec.index
        self.encoder_step = encoder_step

    def identity(self) -> dict[str, Any]:
        identity = {"corpus": file_hash(self.index.corpus), "nbits": self.index.nbits,
                    "partitions": self.index.partitions}
        if self.encoder_step is None:
            from apexdsp.indexes.encoder import encoder_fingerprint

            identity["encoder"] = encoder_fingerprint(self.index.encoder.path)
        return identity

    def encoder_dir(self, context: RunContext) -> Path:
        if self.encoder_step is None:
            return self.index.encoder.path
        return context.step_dir(self.encoder_step) / "encoder"

    def run(self, context: RunContext, work_dir: Path) -> StepOutput:
        from apexdsp.indexes.colbert_index import build_index

        manifest = build_index(self.index.corpus, self.encoder_dir(context), work_dir / "index",
                               nbits=self.index.nbits, partitions=self.index.partitions)
        metrics = {"passages": manifest.passages, "build_seconds": manifest.build_seconds,
                   "index_bytes": manifest.index_bytes, "passages_per_second": manifest.passages_per_second}
        return StepOutput(params={"corpus": recorded_path(self.index.corpus), "nbits": self.index.nbits,
                                  "partitions": manifest.partitions}, metrics=metrics,
                          artifacts=["index/apexdsp-index.json"])


def index_identity(spec: ExperimentSpec, index_step: IndexStep | None) -> dict[str, Any] | None:
    """What the programs search, for the keys of the steps that search it."""
    index = spec.index
    if index is None:
        return None
    if index.kind == "bm25":
        return {"kind": "bm25", "corpus": file_hash(index.corpus)}
    searcher = {} if index.retriever == "colbert" else {"retriever": index.retriever}  # keys of colbert unchanged
    if index.reuse is not None:
        return {"kind": "colbert", "manifest": file_hash(index.reuse / "apexdsp-index.json"), **searcher}
    return {"kind": "colbert", "step": index_step.key, **searcher}


class CompileStep(Step):
    """One optimizer stage applied to the previous stage's program."""

    kind = "compile"
    seconds_metric = "compile_seconds"  # over every attempt of a resumed compile, pauses left out

    def __init__(self, spec: ExperimentSpec, position: int, label: str, upstream: list[Step],
                 previous: CompileStep | None, searched: dict[str, Any] | None):
        super().__init__(label, upstream)
        self.spec = spec
        self.stage = spec.optimizer.stages[position]
        self.position = position
        self.previous = previous
        self.searched = searched

    def identity(self) -> dict[str, Any]:
        spec = self.spec
        stage = self.stage.model_dump(mode="json")
        how_it_runs = STAGE_KINDS[self.stage.kind].execution_settings  # not what it computes
        stage["settings"] = {k: v for k, v in stage["settings"].items() if k not in how_it_runs}
        return {"stage": stage, "program": spec.program.model_dump(mode="json"),
                "lm": spec.lm.model_dump(mode="json"), "seed": spec.seed, "index": self.searched,
                "train": source_identity(spec.data.train), "val": source_identity(spec.data.val)}

    def progress(self, work_dir: Path) -> str | None:
        described = STAGE_KINDS[self.stage.kind].progress
        return described(work_dir) if described is not None else None

    def run(self, context: RunContext, work_dir: Path) -> StepOutput:
        previous = context.step_dir(self.previous) / "program" if self.previous else None
        program = load_program(context, previous)
        stage_context = StageContext(trainset=load_source(self.spec.data.train),
                                     valset=load_source(self.spec.data.val), seed=self.spec.seed,
                                     work_dir=work_dir, retriever=context.retriever(),
                                     threads=self.spec.evaluation.threads)
        compiled = run_stage(self.stage.kind, program, dict(self.stage.settings), stage_context)
        save_program(compiled, work_dir / "program", context,
                     {"name": self.stage.kind, "stage": self.label, "settings": self.stage.settings})
        params = {"stage": self.label, "stage_kind": self.stage.kind,
                  **{f"settings.{k}": v for k, v in self.stage.settings.items()},
                  "train": self.spec.data.train.describe(), "n_train": len(stage_context.trainset),
                  "n_val": len(stage_context.valset)}
        return StepOutput(params=params, metrics=stage_context.metrics,
                          artifacts=["program"], history=stage_context.history)

    def chain(self) -> list[CompileStep]:
        """This stage and the stages before it, first first."""
        return (self.previous.chain() if self.previous else []) + [self]


class EvaluateStep(Step):
    """Evaluate the program after a stage (or uncompiled) on the test questions."""

    kind = "evaluate"

    def __init__(self, spec: ExperimentSpec, label: str, upstream: list[Step], compiled: CompileStep | None,
                 searched: dict[str, Any] | None):
        super().__init__(label, upstream)
        self.spec = spec
        self.compiled = compiled
        self.searched = searched

    def identity(self) -> dict[str, Any]:
        spec = self.spec
        return {"program": spec.program.model_dump(mode="json"), "lm": spec.lm.model_dump(mode="json"),
                "index": self.searched, "test": source_identity(spec.data.test)}

    def with_active_seconds(self, metrics: dict[str, float], seconds: float) -> dict[str, float]:
        """An evaluation's ``seconds`` (and per question) are the step's active time: the report's own
        wall clock (kept in report.json) counts the hours a paused process waited."""
        n = metrics.get("n") or 0
        return {**metrics, "seconds": seconds, "seconds_per_question": seconds / n if n else 0.0}

    def progress(self, work_dir: Path) -> str | None:
        path = work_dir / "progress.jsonl"  # one line per question answered (evaluate_program's checkpoint)
        if not path.is_file():
            return None
        answered = sum(1 for line in path.read_text().splitlines() if line.strip())
        return f"{answered} of {len(load_source(self.spec.data.test))} test questions answered"

    def run(self, context: RunContext, work_dir: Path) -> StepOutput:
        import contextlib
        import sys

        from apexdsp.evaluation import decomposition_summary, evaluate_program
        from apexdsp.programs.registry import RETRIEVAL_FREE

        spec = self.spec
        questions = load_source(spec.data.test)
        program = load_program(context, context.step_dir(self.compiled) / "program" if self.compiled else None)
        with contextlib.redirect_stdout(sys.stderr):  # DSPy's progress bar
            report = evaluate_program(program, questions, threads=spec.evaluation.threads,
                                      retrieves=spec.program.name not in RETRIEVAL_FREE, progress=True,
                                      checkpoint=work_dir / "progress.jsonl")  # a killed evaluation resumes
        write_json_atomic(report.model_dump(), work_dir / "report.json")
        params = {"program": spec.program.name, "stage": self.label, "lm": spec.lm.default,
                  "lm_modules": spec.lm.modules, "test": spec.data.test.describe(), "n": report.n,
                  "dataset": dataset_name(spec.data.test),
                  "index": spec.index.kind if spec.index else "none", "program_options": spec.program.options}
        metrics = {k: v for k, v in report.summary().items() if isinstance(v, (int, float)) and v is not None}
        if "decomposition" in spec.evaluation.metrics:
            metrics.update(decomposition_summary(report.results, questions, context.retriever()))
        if self.compiled is not None:  # what the evaluated program cost to compile, every stage up to it
            metrics["compile_seconds"] = sum(compile_seconds(context, step) for step in self.compiled.chain())
        return StepOutput(params=params, metrics=metrics, artifacts=["report.json"])


def compile_seconds(context: RunContext, step: CompileStep) -> float:
    """The measured compile time of a finished compile step (from its cached result)."""
    result = json.loads((context.step_dir(step) / RESULT_FILE).read_text())
    return float(result["metrics"]["compile_seconds"])


def dataset_name(source: QuestionSource) -> str:
    """``hotpotqa/dev`` for ``.../hotpotqa/dev.jsonl``; the hub name for a hub source."""
    if source.file is None:
        return f"{source.hub}/{source.split or 'default'}"
    return f"{source.file.parent.name}/{source.file.stem}"


def plan_steps(spec: ExperimentSpec) -> list[Step]:
    """Every step of the spec in dependency order."""
    steps: list[Step] = []
    index_step = None
    if spec.index is not None and spec.index.kind == "colbert" and spec.index.reuse is None:
        encoder_step = EncoderStep(spec) if spec.index.encoder.train else None
        steps += [encoder_step] if encoder_step else []
        index_step = IndexStep(spec, encoder_step)
        steps.append(index_step)
    searched = index_identity(spec, index_step)
    base = [index_step] if index_step else []
    compiled: dict[str, CompileStep | None] = {"uncompiled": None}
    previous = None
    labels = stage_labels([stage.label for stage in spec.optimizer.stages])
    evaluated = set(spec.checkpoints())
    if "uncompiled" in evaluated:
        steps.append(EvaluateStep(spec, "uncompiled", list(base), None, searched))
    # Each stage's evaluation right after it: a run stopped half-way has a comparable row per stage so far.
    for position, label in enumerate(labels):
        previous = CompileStep(spec, position, label, base + ([previous] if previous else []), previous, searched)
        compiled[label] = previous
        steps.append(previous)
        if label in evaluated:
            steps.append(EvaluateStep(spec, label, base + [previous], previous, searched))
    return steps
