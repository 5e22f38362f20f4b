"""Paired comparison of evaluation reports: each report against a baseline, overall and by question form.

    .venv/bin/python benchmarks/paired_table.py BASE.json NEW.json [NEW2.json ...] [--out table.json]

BASE and NEW are ``apexdsp evaluate`` result files (``.apexdsp/runs/evaluate-*.json``) of the same
questions. For EM, F1, Hit and recall it prints each report's mean, the paired difference against BASE
with its 95% bootstrap interval and the wins / losses; then EM by form (open questions, yes/no, "X or Y"),
where a coin already scores about 0.5 on the closed forms, so a gain must hold on the open ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apexdsp.metrics.paired import paired_by_id
from apexdsp.programs.question_forms import choice_options, is_yes_no_question
from apexdsp.tracking.run import write_json_atomic

METRICS = ("em", "f1", "hit", "recall")


def form_of(question: str) -> str:
    return "choice" if choice_options(question) else "yes/no" if is_yes_no_question(question) else "open"


def scores(report: dict, metric: str, form: str | None = None) -> dict[str, float]:
    return {row["id"]: float(row.get(metric) or 0.0) for row in report["results"]
            if form is None or form_of(row["question"]) == form}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("new", nargs="+")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    base = json.loads(Path(args.base).read_text())
    table = []
    for path in args.new:
        new = json.loads(Path(path).read_text())
        entry = {"report": path, "overall": {}, "by_form": {}}
        for metric in METRICS:
            entry["overall"][metric] = paired_by_id(scores(base, metric), scores(new, metric), metric=metric).to_dict()
        for form in ("open", "yes/no", "choice"):
            entry["by_form"][form] = paired_by_id(scores(base, "em", form), scores(new, "em", form)).to_dict()
        table.append(entry)
        print(f"\n{path} against {args.base}")
        print("| metric | base | new | difference | 95% interval | wins | losses |\n|---|---|---|---|---|---|---|")
        rows = [(m, entry["overall"][m]) for m in METRICS] + [(f"EM {f}", entry["by_form"][f])
                                                              for f in ("open", "yes/no", "choice")]
        for label, d in rows:
            print(f"| {label} (n={d['n']}) | {d['base']:.3f} | {d['new']:.3f} | {d['difference']:+.3f} | "
                  f"[{d['low']:+.3f}, {d['high']:+.3f}] | {d['wins']} | {d['losses']} |")
    if args.out:
        write_json_atomic({"base": args.base, "comparisons": table}, args.out)


if __name__ == "__main__":
    main()
