"""The answer step alone, on recorded trajectories: how its EM/F1 depend on the demos it is shown.

A program's final answer is one LM call on (question, findings, passages). Re-running only that call on the
trajectories an ``apexdsp evaluate`` run saved isolates it from planning and retrieval, at one LM call per
question instead of six. Demos are labeled (gold answer, only where it appears in the passages shown, or
yes/no), drawn from a second run on *training* questions, never from the questions scored.

    .venv/bin/python benchmarks/answer_step.py --demos-from TRAIN_RUN.json --score RUN.json [RUN.json ...] \
        --demos 0,2,4,6 --seeds 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

from apexdsp.paths import configure_environment

configure_environment()


def answer_inputs(run_file: str) -> list[dict]:
    """Per question of a saved run: the answer step's inputs, rebuilt from its trajectory, and the gold."""
    from apexdsp.programs.evidence import evidence_pool
    from apexdsp.programs.executor import findings_text
    from apexdsp.programs.trajectory import Trajectory

    rows = []
    for result in json.load(open(run_file))["results"]:
        trajectory = Trajectory.model_validate(result["trajectory"])
        rows.append({"question": result["question"], "gold": result["gold"], "records": trajectory.subgoals,
                     "findings": findings_text(trajectory.subgoals), "passages": evidence_pool(trajectory, 5)})
    return rows


def labeled(row: dict) -> bool:
    from apexdsp.metrics import answer_hit

    return row["gold"].lower() in ("yes", "no") or bool(
        answer_hit(row["gold"], [f"{p.title} {p.text}" for p in row["passages"]]))


def score(rows: list[dict], demos: list[dict], threads: int) -> dict:
    import dspy

    from apexdsp.metrics import exact_match, f1
    from apexdsp.programs.answer import AnswerStep
    from apexdsp.programs.evidence import format_passages

    step = AnswerStep()
    step.generate.demos = [dspy.Example(question=d["question"], findings=d["findings"],
                                        passages=format_passages(d["passages"], step.passage_chars),
                                        answer=d["gold"]) for d in demos]
    started = time.perf_counter()
    predictions = dspy.Parallel(num_threads=threads, disable_progress_bar=True)(
        [(step, {k: row[k] for k in ("question", "findings", "passages", "records")}) for row in rows])
    answers = [p.answer if p is not None else "" for p in predictions]
    shown = {d["gold"] for d in demos}
    return {"em": sum(exact_match(a, r["gold"]) for a, r in zip(answers, rows)) / len(rows),
            "f1": sum(f1(a, r["gold"]) for a, r in zip(answers, rows)) / len(rows),
            "empty": sum(not a for a in answers) / len(rows),
            "copied_demo_answer": sum(a in shown for a in answers) / len(rows),
            "seconds": round(time.perf_counter() - started, 1),
            "most_common": Counter(answers).most_common(3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos-from", required=True, help="a saved run on training questions")
    parser.add_argument("--score", nargs="+", required=True, help="saved runs whose questions are scored")
    parser.add_argument("--demos", default="0,2,4,6", help="demo counts to try")
    parser.add_argument("--seeds", type=int, default=2, help="demo draws per count")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--lm", default="smollm2-135m")
    args = parser.parse_args()

    from apexdsp.runtime import configure_dspy

    configure_dspy(args.lm)
    pool = [row for row in answer_inputs(args.demos_from) if labeled(row)]
    rows = [row for run in args.score for row in answer_inputs(run)]
    for count in (int(c) for c in args.demos.split(",")):
        for seed in range(args.seeds if count else 1):
            demos = random.Random(seed).sample(pool, count)
            print(json.dumps({"demos": count, "seed": seed, "n": len(rows), **score(rows, demos, args.threads)}),
                  flush=True)


if __name__ == "__main__":
    main()
