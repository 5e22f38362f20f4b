"""Typed configuration of the reward-gated bootstrapping optimizer.

Two groups: :class:`DemoGates`, which decide what a good trace and a good demo are (the rewards and
their thresholds), and :class:`BootstrapConfig`, the search around them (how many demos, how many
candidate sets, the selection metric, seed and threads). Both are pydantic models so that a compile's
manifest and MLflow run record exactly the settings that produced it, and a typo in a config fails loudly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from apexdsp.rewards.decomposition import DecompositionWeights


class DemoGates(BaseModel):
    """When a trace, and a module call inside it, is good enough to become a demonstration.

    **Trace gate** (the whole run): the program's own answer reaches ``min_answer_f1`` (1.0 is exact
    match up to normalisation), or, with ``accept_hit``, the documents it retrieved contain the gold
    answer (the Hit term of QAgent's frozen-generator reward: the search succeeded even where a 135M
    reader failed to extract the answer). SmolLM2-135M answers 3-5% of HotpotQA exactly, so the strict
    gate (``min_answer_f1=1, accept_hit=False``) keeps only a handful of traces; the default is the
    relaxed, still outcome-based gate, and the compile reports how many traces passed on which ground.

    **Module gates** (each call inside a passing trace), by the module's signature:

    * planner (``WritePlan``): the plan parsed without falling back, and its decomposition reward
      (format, structure, placeholders, retrieval-grounded executability) is at least ``min_plan_reward``;
    * query writers (``WriteQuery``, ``RewriteQuery``): the query retrieved a gold supporting paragraph;
    * analysis (``AnalyzeAnswer``): said *answered*, gave an answer, and the answer is in the passages;
    * answer steps (``AnswerFromFindings``, ``AnswerFromPassages``, and their yes/no ``DecideFrom...``):
      answer F1 >= ``min_final_answer_f1``
      (the answer a demo teaches must be right, whatever the trace gate accepted). Below it, with
      ``label_answers_from_evidence``, the demo shows the *gold* answer instead, but only when the gold
      answer is in the findings and passages the step was shown (or is yes/no): a labeled demo, as DSPy's
      ``LabeledFewShot`` makes, grounded in the run's own evidence. It teaches what a 135M reader most
      lacks, copying a short span instead of a sentence; ``labeled`` in its rewards marks it;
    * query rewriter: the rewrite must differ from the query that failed;
    * reflector (``Reflect``): a readable decision (*yes*, or *no* with follow-up questions);
    * any other predictor (a user's own): the trace gate, and every output field non-empty.
    """

    model_config = ConfigDict(extra="forbid")

    min_answer_f1: float = Field(0.5, ge=0, le=1, description="trace gate: answer F1 at least this ...")
    accept_hit: bool = Field(True, description="... or the gold answer is in the retrieved documents")
    min_plan_reward: float = Field(0.7, ge=0, le=1, description="planner demos: decomposition reward")
    min_final_answer_f1: float = Field(0.5, ge=0, le=1, description="answer-step demos: answer F1")
    label_answers_from_evidence: bool = Field(
        True, description="answer-step demos: below that F1, show the gold answer if it is in the step's input")
    require_query_hit: bool = Field(True, description="query demos: the query retrieved a gold title")
    require_extractive_analysis: bool = Field(True, description="analysis demos: answer found in passages")
    reward_k: int = Field(5, ge=1, description="passages per sub-question for the executability reward")
    plan_max_steps: int = Field(4, ge=1, description="steps the decomposition reward scores")
    decomposition_weights: DecompositionWeights = Field(default_factory=DecompositionWeights)


SelectionMetric = Literal["em", "f1", "hit", "decomposition"]


class BootstrapConfig(BaseModel):
    """The search: demo budgets, candidate sets and how they are judged on the validation set.

    Demos lengthen every prompt of their module (an analysis demo carries five passages, ~400 tokens),
    and a 135M model on a CPU pays for each token, so budgets are small and set per signature
    (``max_demos_by_signature``: plans are short and the planner benefits most from examples).
    """

    model_config = ConfigDict(extra="forbid")

    gates: DemoGates = Field(default_factory=DemoGates)
    max_demos: int = Field(2, ge=0, description="demos per predictor (default)")
    max_demos_by_signature: dict[str, int] = Field(
        default_factory=lambda: {"WritePlan": 4},
        description="per-signature override, e.g. {'WritePlan': 4}")
    num_candidates: int = Field(3, ge=1, description="demo sets tried on the valset (the first is the top-ranked)")
    metric: SelectionMetric = Field("em", description="what picks the best candidate on the valset")
    tie_breakers: list[SelectionMetric] = Field(
        default_factory=lambda: ["decomposition", "f1"],
        description="metrics that break ties of the main one, in order")
    max_copy_rate: float = Field(0.2, ge=0, le=1, description=(
        "a candidate whose wrong answers repeat a demo's answer on more of the valset is degenerate"))
    score_zero_shot: bool = Field(True, description="score the program without demos as a reference")
    allow_zero_shot: bool = Field(False, description="let the zero-shot program win the selection")
    calibrate_choices: bool = Field(False, description=(
        "fit the yes/no and A/B steps' offsets on the trainset after selection (optimizers.calibration); "
        "off by default: with SmolLM2-135M it removed the position bias but did not raise dev EM (docs/notes/programs-and-bootstrap.md)"))
    seed: int = Field(0, description="seed of the candidate sampling")
    threads: int = Field(8, ge=1, description="concurrent questions (the LM batches them)")
    progress: bool = Field(True, description="show progress bars")

    def demo_budget(self, signature_name: str) -> int:
        return self.max_demos_by_signature.get(signature_name, self.max_demos)


__all__ = ["BootstrapConfig", "DemoGates", "SelectionMetric"]
