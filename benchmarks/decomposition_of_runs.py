"""Mean decomposition reward (and EM/F1) of saved evaluation runs, for the uncompiled-vs-compiled table.

``apexdsp evaluate`` writes every question's trajectory to ``.apexdsp/runs/evaluate-*.json``; this scores
the first planner plan of each with :func:`apexdsp.evaluation.decomposition_summary` (the reward, k and
step limit the bootstrapping gates use), searching the index the runs used. ``apexdsp run`` computes the
same figures for evaluation steps whose spec lists the ``decomposition`` metric.

    .venv/bin/python benchmarks/decomposition_of_runs.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/dev.jsonl RUN.json [RUN.json ...]
"""

from __future__ import annotations

import argparse
import json

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
    from apexdsp.evaluation import EvalReport, decomposition_summary
    from apexdsp.indexes import load_retriever
    from apexdsp.optimizers.config import DemoGates

    gates = DemoGates()
    questions = read_questions(args.questions)
    retriever = load_retriever(args.index)
    for path in args.runs:
        with open(path) as handle:
            report = EvalReport.model_validate(json.load(handle))
        summary = decomposition_summary(report.results, questions, retriever, k=args.k,
                                        max_steps=gates.plan_max_steps)
        print(json.dumps({
            "run": path, "n": report.n, "em": report.em, "f1": report.f1, **summary,
            "plan_fallback_rate": report.plan_fallback_rate,
            "seconds_per_question": report.seconds_per_question,
        }))


if __name__ == "__main__":
    main()
