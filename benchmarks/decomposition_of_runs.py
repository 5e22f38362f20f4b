"""Mean decomposition reward (and EM/F1) of saved evaluation runs, for the uncompiled-vs-compiled table.

``apexdsp evaluate`` writes every question's trajectory to ``.apexdsp/runs/evaluate-*.json``; this scores
the first planner plan of each with :func:`apexdsp.rewards.decomposition_rewards` (the same reward, k and
step limit the bootstrapping gates use), searching the index the runs used.

    .venv/bin/python benchmarks/decomposition_of_runs.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/dev.jsonl RUN.json [RUN.json ...]
"""

from __future__ import annotations

import argparse
import json
import statistics

from apexdsp.paths import configure_environment

configure_environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--index", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes import load_retriever
    from apexdsp.optimizers.config import DemoGates
    from apexdsp.programs.trajectory import Trajectory
    from apexdsp.rewards import decomposition_rewards

    gates = DemoGates()
    by_id = {q.id: q for q in read_questions(args.questions)}
    retriever = load_retriever(args.index)
    for path in args.runs:
        with open(path) as handle:
            report = json.load(handle)
        rows = [row for row in report["results"] if row.get("trajectory")]
        questions = [by_id[row["id"]] for row in rows]
        trajectories = [Trajectory.model_validate(row["trajectory"]) for row in rows]
        rewards = decomposition_rewards(questions, trajectories, retriever=retriever, k=args.k,
                                        max_steps=gates.plan_max_steps, weights=gates.decomposition_weights)
        components: dict[str, list[float]] = {}
        for reward in rewards:
            for name, value in reward.components.items():
                components.setdefault(name, []).append(value)
        print(json.dumps({
            "run": path, "n": report["n"], "em": report["em"], "f1": report["f1"],
            "decomposition": statistics.fmean(r.value for r in rewards),
            "components": {name: round(statistics.fmean(v), 4) for name, v in components.items()},
            "plan_fallback_rate": report.get("plan_fallback_rate"),
            "seconds_per_question": report["seconds_per_question"],
        }))


if __name__ == "__main__":
    main()
