"""EM on "X or Y" questions with the answer step's choice route on and off (same program, index, questions).

The route (:mod:`apexdsp.programs.question_forms`) only changes questions that name two options, so this
runs a program on those questions of a file twice: once as shipped (options offered as A / B, the answer
is the chosen option's words) and once with the route switched off (the open answer predictor, as before
the route existed). Everything else is identical, so the difference is the route's.

    .venv/bin/python benchmarks/choice_route.py --index .apexdsp/indexes/hotpotqa \
        --questions ../shared/data/hotpotqa/dev.jsonl --program rag --program apex
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from unittest import mock

from apexdsp.paths import configure_environment

configure_environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True)
    parser.add_argument("--questions", required=True)
    parser.add_argument("--program", action="append", required=True)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    from apexdsp.data.loaders import read_questions
    from apexdsp.evaluation import evaluate_program
    from apexdsp.indexes import load_retriever
    from apexdsp.programs import answer
    from apexdsp.programs.question_forms import choice_options
    from apexdsp.programs.registry import build_program
    from apexdsp.runtime import configure_dspy

    questions = [q for q in read_questions(args.questions) if choice_options(q.question)]
    retriever = load_retriever(args.index)
    configure_dspy()
    for name in args.program:
        for route in ("open", "choice"):
            switch = mock.patch.object(answer, "choice_options", lambda _: None) if route == "open" \
                else contextlib.nullcontext()
            with switch, contextlib.redirect_stdout(sys.stderr):
                report = evaluate_program(build_program(name, retriever=retriever), questions,
                                          threads=args.threads, progress=True)
            answers = Counter(row.prediction for row in report.results)
            options_given = sum(row.prediction in choice_options(q.question) for q, row in
                                zip(questions, report.results))
            print(json.dumps({"program": name, "route": route, "n": report.n, "em": round(report.em, 4),
                              "f1": round(report.f1, 4), "answers_that_are_an_option": options_given,
                              "first_option_chosen": sum(row.prediction == choice_options(q.question)[0]
                                                         for q, row in zip(questions, report.results)),
                              "most_common_answers": answers.most_common(3),
                              "seconds_per_question": round(report.seconds_per_question, 2)}), flush=True)


if __name__ == "__main__":
    main()
