"""Mean decomposition reward of a program's planner alone, on a question file (before / after planner GRPO).

Only the planner runs (one LM call per question, batched by the local engine), so the figure for 300
questions takes minutes instead of a full program evaluation. Each plan is scored with
:func:`apexdsp.rewards.decomposition_rewards` exactly as the bootstrapping gates and the GRPO planner
reward score it (same k, step limit and weights), searching the given index.

Two noise figures come with the means. ``--repeats N`` reruns each (greedy) planner N times: the local
engine batches whatever calls are in flight together and bf16 matmuls are not batch-invariant, so reruns
can differ; the spread of their means is the evaluation's run-to-run noise. Every program after the first is
also compared with the first question by question (paired difference of the rewards, its standard error
and a 95 % interval), which is the right test for "did GRPO raise the reward on these 300 questions".

    .venv/bin/python benchmarks/planner_decomposition.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/dev.jsonl --compiled DIR [--compiled DIR ...] [--program apex]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from apexdsp.paths import configure_environment

configure_environment()


def plan_rewards(planner, questions, retriever, threads: int) -> tuple[list, float]:
    """(rewards, seconds) of ``planner`` on ``questions``."""
    from apexdsp.optimizers.config import DemoGates
    from apexdsp.programs.trajectory import Trajectory
    from apexdsp.rewards import decomposition_rewards

    def plan(question):
        return planner(question=question.question).record

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        records = list(pool.map(plan, questions))
    seconds = time.perf_counter() - started
    trajectories = [Trajectory(program="planner", question=q.question, plans=[r]) for q, r in zip(questions, records)]
    gates = DemoGates()
    rewards = decomposition_rewards(questions, trajectories, retriever=retriever, k=gates.reward_k,
                                    max_steps=gates.plan_max_steps, weights=gates.decomposition_weights)
    return rewards, seconds


def paired(before: list, after: list) -> dict:
    """Mean per-question difference ``after - before``, its standard error and a normal 95 % interval."""
    diffs = [b.value - a.value for a, b in zip(before, after, strict=True)]
    mean = statistics.fmean(diffs)
    stderr = statistics.stdev(diffs) / len(diffs) ** 0.5
    return {"mean_difference": round(mean, 4), "stderr": round(stderr, 4),
            "ci95": [round(mean - 1.96 * stderr, 4), round(mean + 1.96 * stderr, 4)],
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs)}


def summarise(label: str, rewards: list, seconds: float) -> dict:
    components: dict[str, list[float]] = {}
    for reward in rewards:
        for name, value in reward.components.items():
            components.setdefault(name, []).append(value)
    values = [r.value for r in rewards]
    return {"program": label, "n": len(values), "decomposition": round(statistics.fmean(values), 4),
            "stderr": round(statistics.stdev(values) / len(values) ** 0.5, 4),
            "components": {name: round(statistics.fmean(v), 4) for name, v in components.items()},
            "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--compiled", action="append", default=[], help="A compiled program directory (repeatable).")
    parser.add_argument("--program", action="append", default=[], help="An uncompiled registry program (repeatable).")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=1, help="Greedy reruns of each planner (run-to-run noise).")
    args = parser.parse_args()

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes import load_retriever
    from apexdsp.optimizers.compiled import load_compiled
    from apexdsp.programs.registry import build_program
    from apexdsp.runtime import configure_dspy

    questions = read_questions(args.questions, limit=args.limit)
    retriever = load_retriever(args.index)
    configure_dspy(lm=args.lm)
    programs = [(name, build_program(name, retriever=retriever)) for name in args.program]
    programs += [(path, load_compiled(path, retriever=retriever).program) for path in args.compiled]
    first: list | None = None
    for label, program in programs:
        runs = [plan_rewards(program.planner, questions, retriever, args.threads) for _ in range(args.repeats)]
        summary = summarise(label, *runs[0])
        if args.repeats > 1:
            means = [statistics.fmean(r.value for r in rewards) for rewards, _ in runs]
            summary["repeats"] = {"means": [round(m, 4) for m in means], "spread": round(max(means) - min(means), 4),
                                  "changed_questions": sum(a.value != b.value for a, b in zip(runs[0][0], runs[-1][0]))}
        if first is None:
            first = runs[0][0]
        else:
            summary["paired_vs_first"] = paired(first, runs[0][0])
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
