"""The reading ceiling: a program's reader alone, shown the gold paragraphs instead of what was retrieved.

Each question's supporting paragraphs (plus ``--distractors`` of its own non-supporting ones, in the
record's order) go to the reader module exactly as the program would show passages (same predictor, same
adapter, same passage cut), so the figure isolates reading from searching. With ``--compiled DIR`` the
reader is that compiled program's (its demos, and the fine-tuned LM where a stage trained it).

    .venv/bin/python benchmarks/reading_ceiling.py --questions ../shared/data/hotpotqa/dev.jsonl --out R.json
    .venv/bin/python benchmarks/reading_ceiling.py --compiled .apexdsp/compiled/rag-sft --out R-sft.json

Prints EM / F1 overall and by question form (open, yes/no, "X or Y"), and seconds per question.
"""

from __future__ import annotations

import argparse
import json
import time

from apexdsp.paths import configure_environment

configure_environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", default="../shared/data/hotpotqa/dev.jsonl")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--compiled", default=None, help="a compiled rag program whose reader to use")
    parser.add_argument("--distractors", type=int, default=1, help="non-supporting paragraphs added per question")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import dspy

    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes.base import SearchHit
    from apexdsp.metrics.answer import exact_match, f1
    from apexdsp.programs.question_forms import choice_options, is_yes_no_question
    from apexdsp.programs.answer import PassageReader
    from apexdsp.programs.config import RagConfig
    from apexdsp.runtime import configure_dspy
    from apexdsp.tracking.run import write_json_atomic

    questions = read_questions(args.questions, limit=args.limit)
    configure_dspy(lm=args.lm)
    if args.compiled:  # the program is rebuilt over its own index, as evaluate --compiled does
        from apexdsp.indexes import load_retriever
        from apexdsp.optimizers.compiled import load_compiled, read_manifest

        manifest = read_manifest(args.compiled)
        retriever = load_retriever(manifest.index.path) if manifest.index else None
        reader = load_compiled(args.compiled, retriever=retriever).program.reader
    else:
        config = RagConfig()
        reader = PassageReader(config.passage_chars, config.answer_tokens)

    def passages_of(question):
        gold = [p for p in question.paragraphs if p.is_supporting]
        other = [p for p in question.paragraphs if not p.is_supporting][: args.distractors]
        return [SearchHit(pid=str(i), title=p.title, text=p.text, score=0.0, rank=i + 1)
                for i, p in enumerate(gold + other)]

    examples = [dspy.Example(question=q.question, passages=passages_of(q)).with_inputs("question", "passages")
                for q in questions]
    started = time.perf_counter()
    results = reader.batch(examples, num_threads=args.threads, return_failed_examples=False)
    seconds = time.perf_counter() - started
    rows = []
    for question, result in zip(questions, results, strict=True):
        answer = getattr(result, "answer", "") or ""
        form = ("choice" if choice_options(question.question) else
                "yes/no" if is_yes_no_question(question.question) else "open")
        rows.append({"id": question.id, "form": form, "answer": answer, "gold": question.answer,
                     "em": exact_match(answer, question.answers), "f1": f1(answer, question.answers)})

    def figures(subset):
        n = len(subset)
        return {"n": n, "em": sum(r["em"] for r in subset) / max(n, 1), "f1": sum(r["f1"] for r in subset) / max(n, 1)}

    summary = {"questions": args.questions, "compiled": args.compiled, "distractors": args.distractors,
               "all": figures(rows), **{form: figures([r for r in rows if r["form"] == form])
                                       for form in ("open", "yes/no", "choice")},
               "seconds_per_question": seconds / max(len(rows), 1)}
    write_json_atomic({"summary": summary, "rows": rows}, args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
