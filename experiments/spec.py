"""Experiment specs: one TOML file declares data, index, program, LMs, optimizer stages and metrics.

A spec is checked completely before any work starts, so a typo costs a second rather than the hour of
compute that would precede the step reading it. Every problem is reported as one line that names the
file and the key (``hotpotqa-apex.toml: optimizer.stages[1].kind: unknown stage kind 'grop'; ...``).

Relative file names are looked up next to the spec first, then in the shared data folder
(:func:`apexdsp.paths.shared_data_dir`), so the checked-in specs can say ``hotpotqa/dev.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from apexdsp.errors import ApexError
from apexdsp.paths import recorded_path
from apexdsp.experiments.stages import STAGE_KINDS, stage_labels

METRICS = ("em", "f1", "hit", "recall")  # the default; "decomposition" scores the plans too


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(value: str | Path, info: ValidationInfo) -> Path:
    """A file named in a spec: absolute, next to the spec, or in the shared data folder."""
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path(base) / path for base in (info.context or {}).get("search_dirs", [Path.cwd()])]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    looked = ", ".join(str(c.parent) for c in candidates)
    raise ValueError(f"file {str(value)!r} not found (looked in {looked})")


class QuestionSource(_Strict):
    """A slice of a question file (``offset``/``limit`` in file order), or a hub data set by name.

    ``sample`` draws that many questions from the slice at random (``sample_seed``; file order kept), so a
    small validation set has the slice's mix of question types: a run of consecutive questions need not
    (HotpotQA train 1200-1223 holds one comparison question in 24; dev holds 52 in 300).
    """

    file: Path | None = None
    hub: str | None = None
    split: str | None = None
    offset: int = Field(0, ge=0)
    limit: int | None = Field(None, ge=1)
    sample: int | None = Field(None, ge=1)
    sample_seed: int = 0

    @field_validator("file", mode="before")
    @classmethod
    def _exists(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, (str, Path)) else value

    @field_validator("hub")
    @classmethod
    def _known_hub(cls, value: str | None) -> str | None:
        from apexdsp.data.hub import HUB_DATASETS

        if value is not None and value.lower() not in HUB_DATASETS:
            raise ValueError(f"unknown hub data set {value!r}; known: {', '.join(sorted(HUB_DATASETS))}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> QuestionSource:
        if (self.file is None) == (self.hub is None):
            raise ValueError("give exactly one of 'file' or 'hub'")
        if self.split is not None and self.hub is None:
            raise ValueError("'split' applies to hub data sets only")
        return self

    def describe(self) -> str:
        name = recorded_path(self.file) if self.file else f"hub:{self.hub}:{self.split or 'default'}"
        end = f"{self.offset + self.limit}" if self.limit else "end"
        drawn = f" (sample {self.sample}, seed {self.sample_seed})" if self.sample else ""
        return f"{name}[{self.offset}:{end}]{drawn}"


class DataSpec(_Strict):
    """Train / validation / test questions. Compile stages need ``train``; evaluation needs ``test``."""

    train: QuestionSource | None = None
    val: QuestionSource | None = None
    test: QuestionSource

    @model_validator(mode="after")
    def _no_overlap_with_test(self) -> DataSpec:
        for role in ("train", "val"):
            source = getattr(self, role)
            if source is not None and source.file is not None and source.file == self.test.file:
                if _overlaps(source, self.test):
                    raise ValueError(f"{role} overlaps test ({source.describe()} and {self.test.describe()})")
        return self


def _overlaps(a: QuestionSource, b: QuestionSource) -> bool:
    a_end = a.offset + a.limit if a.limit else float("inf")
    b_end = b.offset + b.limit if b.limit else float("inf")
    return a.offset < b_end and b.offset < a_end


class EncoderTrainFile(_Strict):
    """A question file the encoder trains on, optionally only its first ``limit`` questions."""

    file: Path
    limit: int | None = Field(None, ge=1)

    @field_validator("file", mode="before")
    @classmethod
    def _exists(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, (str, Path)) else value


class EncoderSpec(_Strict):
    """The ColBERT encoder: an existing checkpoint folder (``path``) or one trained from question files.

    ``train`` lists question files, each a path or ``{ file = ..., limit = N }`` (its first N questions, so
    that a data set's test questions stay out of the encoder's training)."""

    path: Path | None = None
    train: list[EncoderTrainFile] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, description="first N questions of each training file without a limit")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=2)
    train_layers: int = Field(0, ge=0, le=6)
    lr_projection: float = Field(1e-3, gt=0)
    lr_encoder: float = Field(3e-5, gt=0)
    distractors_per_question: int = Field(3, ge=0)
    mined_per_question: int = Field(2, ge=0)
    negatives_per_query: int = Field(2, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, le=1)
    heldout_questions: int = Field(64, ge=1)
    heldout_random_passages: int = Field(0, ge=0, description="random passages of each corpus in the held-out pool")
    self_supervised_per_corpus: int = Field(0, ge=0, description="title / sentence -> passage pairs from each corpus")
    eval_every: int = Field(0, ge=0, description="rank the held-out pool every N steps, keep the best (0: last)")
    distill_weight: float = Field(0.0, ge=0, description="KL towards the BM25 + dense teacher (0: off)")
    teacher_bm25_weight: float = Field(1.0, ge=0)
    teacher_temperature: float = Field(0.5, gt=0)
    pca_sample: int = Field(512, ge=8)
    seed: int = 0

    @field_validator("path", mode="before")
    @classmethod
    def _path_exists(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, (str, Path)) else value

    @field_validator("train", mode="before")
    @classmethod
    def _train_files(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [{"file": item} if isinstance(item, (str, Path)) else item for item in value]

    def train_limits(self) -> list[int | None]:
        """Per training file: how many of its first questions are used (``None``: all)."""
        return [item.limit or self.limit for item in self.train]

    @model_validator(mode="after")
    def _one_source(self) -> EncoderSpec:
        if (self.path is None) == (not self.train):
            raise ValueError("give exactly one of 'path' (a trained encoder) or 'train' (question files)")
        return self

    def training_settings(self) -> dict[str, Any]:
        return self.model_dump(exclude={"path", "train", "limit"})


class IndexSpec(_Strict):
    """Where programs search: a ColBERT index built here or reused, or BM25 built in memory (seconds)."""

    kind: Literal["colbert", "bm25"] = "colbert"
    retriever: Literal["colbert", "bm25", "dense", "hybrid"] = Field(
        "hybrid", description="what searches a colbert index's passages (hybrid: ColBERT and BM25 fused by rank)")
    reuse: Path | None = Field(None, description="an existing index folder (colbert)")
    corpus: Path | None = None
    encoder: EncoderSpec | None = None
    nbits: Literal[1, 2, 4, 8] = 2
    partitions: int | None = Field(None, ge=2)

    @field_validator("reuse", "corpus", mode="before")
    @classmethod
    def _exists(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, (str, Path)) else value

    @model_validator(mode="after")
    def _complete(self) -> IndexSpec:
        if self.kind == "bm25":
            if self.corpus is None or self.reuse is not None or self.encoder is not None:
                raise ValueError("kind 'bm25' takes 'corpus' only")
            if "retriever" in self.model_fields_set:
                raise ValueError("'retriever' chooses what searches a colbert index; kind 'bm25' is BM25 already")
        elif self.reuse is not None:
            if self.corpus is not None or self.encoder is not None:
                raise ValueError("'reuse' names a built index: leave out 'corpus' and 'encoder'")
            if not (self.reuse / "apexdsp-index.json").is_file():
                raise ValueError(f"{self.reuse} is not a finished apexdsp index (no apexdsp-index.json)")
        elif self.corpus is None or self.encoder is None:
            raise ValueError("a colbert index needs 'corpus' and 'encoder' (or 'reuse' of a built index)")
        if self.partitions is not None and self.partitions & (self.partitions - 1):
            raise ValueError(f"partitions must be a power of two, got {self.partitions}")
        return self


class ProgramSpec(_Strict):
    """A program of :data:`apexdsp.programs.registry.PROGRAMS` and its options (budgets)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from apexdsp.programs.registry import PROGRAMS

        if value not in PROGRAMS:
            raise ValueError(f"unknown program {value!r}; known: {', '.join(sorted(PROGRAMS))}")
        return value

    @model_validator(mode="after")
    def _options_accepted(self) -> ProgramSpec:
        self.module_names()  # builds the program once: a misspelt option fails here, not hours later
        return self

    def module_names(self) -> list[str]:
        """The program's predictor names (``planner.write_plan``, ...), from a program built without an index."""
        from apexdsp.programs.registry import build_program

        try:
            program = build_program(self.name, retriever=_NoRetriever(), **self.options)
        except ApexError as error:
            raise ValueError(str(error)) from None
        return [name for name, _ in program.named_predictors()]


class _NoRetriever:
    """Stands in for an index while a spec is checked; programs only search when they run."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no index while checking a spec")


class LMSpec(_Strict):
    """The LM of every module (``default``) and per-module overrides keyed by module name or prefix."""

    default: str = "smollm2-135m"
    modules: dict[str, str] = Field(default_factory=dict)


class StageSpec(_Strict):
    """One compile stage: a registered kind (bootstrap, grpo, sft, ...) and its optimizer settings."""

    kind: str
    name: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kind")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {value!r}; known: {', '.join(sorted(STAGE_KINDS))}")
        return value

    @model_validator(mode="after")
    def _settings_accepted(self) -> StageSpec:
        try:
            STAGE_KINDS[self.kind].check_settings(self.settings)
        except ValueError as error:
            raise ValueError(f"settings.{str(error).removeprefix('Value error, ')}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class OptimizerSpec(_Strict):
    stages: list[StageSpec] = Field(default_factory=list)


class EvaluationSpec(_Strict):
    """Which figures to report, and after which stages (default: the uncompiled program and every stage).

    ``decomposition`` adds the mean decomposition reward of the planner's first plans (and its components)
    for programs that plan; it searches the index once more per plan step, no LM call.
    """

    metrics: list[Literal["em", "f1", "hit", "recall", "decomposition"]] = Field(
        default_factory=lambda: list(METRICS))
    after: list[str] | None = None
    threads: int = Field(8, ge=1)


class ExperimentSpec(_Strict):
    """The whole experiment. ``experiment`` is the MLflow experiment its runs go to (default: ``name``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    description: str = ""
    experiment: str | None = None
    seed: int = 0
    track: bool = Field(True, description="log to MLflow (false: compute only, as `apexdsp run --no-track`)")
    data: DataSpec
    index: IndexSpec | None = None
    program: ProgramSpec
    lm: LMSpec = Field(default_factory=LMSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        from apexdsp.optimizers.module_prompts import resolve_module
        from apexdsp.programs.registry import RETRIEVAL_FREE

        if self.index is None and self.program.name not in RETRIEVAL_FREE:
            raise ValueError(f"index: program {self.program.name!r} searches, so the spec needs an [index] table")
        if self.optimizer.stages and self.data.train is None:
            raise ValueError("data.train: compile stages need training questions")
        modules = self.program.module_names()
        for key in self.lm.modules:
            if not any(name == key or name.startswith(key + ".") for name in modules):
                raise ValueError(f"lm.modules.{key}: program {self.program.name!r} has no module {key!r}; "
                                 f"its modules: {', '.join(modules)}")
        for position, stage in enumerate(self.optimizer.stages):
            module = stage.settings.get("module")
            if isinstance(module, str):  # a weight-level stage trains one predictor: it must name exactly one
                try:
                    resolve_module(modules, module)
                except ApexError as error:
                    raise ValueError(f"optimizer.stages[{position}]: settings.module: {error}") from None
        labels = stage_labels([stage.label for stage in self.optimizer.stages])
        if len(set(labels)) != len(labels):
            raise ValueError("optimizer.stages: two stages share a name; give them distinct 'name's")
        for point in self.evaluation.after or []:
            if point not in ("uncompiled", *labels):
                raise ValueError(f"evaluation.after: {point!r} is not 'uncompiled' or a stage "
                                 f"({', '.join(labels) or 'none declared'})")
        return self

    @property
    def mlflow_experiment(self) -> str:
        return self.experiment or self.name

    def checkpoints(self) -> list[str]:
        """Labels of the programs evaluated: ``uncompiled``, then the cumulative stages (``bootstrap+grpo``)."""
        labels = ["uncompiled", *stage_labels([stage.label for stage in self.optimizer.stages])]
        return [label for label in labels if self.evaluation.after is None or label in self.evaluation.after]

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def format_location(location: tuple[Any, ...]) -> str:
    """pydantic's ``('optimizer', 'stages', 1, 'kind')`` as ``optimizer.stages[1].kind``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe_error(name: str, error: ValidationError) -> str:
    """The first problem of a validation error, as ``file: key: message``."""
    first = error.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    elif "input" in first and first["type"] not in ("value_error", "assertion_error"):
        message += f" (got {first['input']!r})"
    location = format_location(first["loc"])
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{name}: {location + ': ' if location else ''}{message}{suffix}"


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and check a spec; any problem is an :class:`ApexError` naming the file and the key."""
    from apexdsp.paths import shared_data_dir

    path = Path(path)
    if not path.is_file():
        raise ApexError(f"experiment spec {path} not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ApexError(f"{path.name}: not valid TOML ({error})") from None
    search_dirs = [path.resolve().parent, shared_data_dir()]
    try:
        return ExperimentSpec.model_validate(raw, context={"search_dirs": search_dirs})
    except ValidationError as error:
        raise ApexError(describe_error(path.name, error)) from None
