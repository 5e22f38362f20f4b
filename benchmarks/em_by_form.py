"""EM of saved evaluation runs split by question form: "X or Y" choices, yes/no, and open questions.

Choice calibration (:mod:`apexdsp.optimizers.calibration`) can only change the answers of the first two
forms, so a run's EM is read per form, with what the closed answers were ("first option" / "yes" shares),
and, for runs over the same questions, paired per question against the first run named.

    .venv/bin/python benchmarks/em_by_form.py .apexdsp/runs/evaluate-apex-A.json .apexdsp/runs/evaluate-apex-B.json
    .venv/bin/python benchmarks/em_by_form.py --only-closed RUN.json ...   # the 64 closed-form rows only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apexdsp.metrics.answer import normalize_answer
from apexdsp.programs.question_forms import choice_options, is_yes_no_question


def form(question: str) -> str:
    if choice_options(question) is not None:
        return "choice"
    return "yes/no" if is_yes_no_question(question) else "open"


def summarise(rows: list[dict]) -> dict:
    by_form: dict[str, list[dict]] = {}
    for row in rows:
        by_form.setdefault(form(row["question"]), []).append(row)
    summary = {"n": len(rows), "em": sum(r["em"] for r in rows) / len(rows) if rows else 0.0}
    for name, group in sorted(by_form.items()):
        summary[f"{name} n"] = len(group)
        summary[f"{name} em"] = sum(r["em"] for r in group)
    choices = by_form.get("choice", [])
    if choices:
        first = sum(normalize_answer(r["prediction"]) == normalize_answer(choice_options(r["question"])[0])
                    for r in choices)
        summary["first option chosen"] = first
    yes_no = by_form.get("yes/no", [])
    if yes_no:
        summary["yes answered"] = sum(normalize_answer(r["prediction"]) == "yes" for r in yes_no)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="evaluation reports (apexdsp evaluate's results file)")
    parser.add_argument("--only-closed", action="store_true", help="keep only choice and yes/no questions")
    args = parser.parse_args()
    reports = []
    for path in args.runs:
        rows = json.loads(path.read_text())["results"]
        if args.only_closed:
            rows = [r for r in rows if form(r["question"]) != "open"]
        reports.append((path.name, {r["id"]: r for r in rows}))
        print(json.dumps({"run": path.name, **summarise(rows)}))
    base_name, base = reports[0]
    for name, rows in reports[1:]:
        shared = sorted(set(base) & set(rows))
        better = sum(rows[i]["em"] > base[i]["em"] for i in shared)
        worse = sum(rows[i]["em"] < base[i]["em"] for i in shared)
        print(json.dumps({"paired": f"{name} vs {base_name}", "questions": len(shared), "better": better,
                          "worse": worse, "em_difference": (better - worse) / len(shared) if shared else 0.0}))


if __name__ == "__main__":
    main()
