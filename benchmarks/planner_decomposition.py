"""Mean decomposition reward of a program's planner alone, on a question file (before / after planner GRPO).

Only the planner runs (one LM call per question, batched by the local engine), so the figure for 300
questions takes minutes instead of a full program evaluation. Each plan is scored with
:func:`apexdsp.rewards.decomposition_rewards` exactly as the bootstrapping gates and the GRPO planner
reward score it (same k, step limit and weights), searching the given index. ``--repeats`` reruns the
planner with sampling (temperature > 0) to give the run-to-run spread; the default is one greedy run.

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
    for label, program in programs:
        rewards, seconds = plan_rewards(program.planner, questions, retriever, args.threads)
        print(json.dumps(summarise(label, rewards, seconds)), flush=True)


if __name__ == "__main__":
    main()
