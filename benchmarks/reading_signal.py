"""Does the generator read? Likelihood scoring of candidate answers against a position baseline.

Where a generated answer can never match (SmolLM2-135M copies passage lines), scoring candidates by the LM's
likelihood is the usual zero-shot way to ask what it *prefers*. Two checks, each against the position
baseline that a model without reading signal would fall back to:

* ``choice``: HotpotQA "X or Y" questions (train lines ``1..--limit``) whose gold answer is one of the two
  options; passages are the question's own ten paragraphs ranked by BM25 (top 5). Each option is scored as
  the assistant's answer; the pick is the higher sum / mean token log-probability. Baseline: the first option.
* ``open``: open questions of a saved ``apexdsp evaluate`` run whose gold answer is the title of one of the
  five passages the answer step was shown; candidates are those titles. Baseline: the first title.

    .venv/bin/python benchmarks/reading_signal.py choice --questions ../shared/data/hotpotqa/train.jsonl --limit 1200
    .venv/bin/python benchmarks/reading_signal.py open --run .apexdsp/runs/evaluate-apex-A.json
"""

from __future__ import annotations

import argparse
import json
import time

from apexdsp.paths import configure_environment

configure_environment()

SYSTEM = "Answer the question with a short factoid from the passages."


class CandidateScorer:
    """Token log-probabilities of candidate answers as the assistant's reply, with the local model."""

    def __init__(self, model_name: str = "smollm2-135m", threads: int = 1):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from apexdsp.lm.gguf_models import ensure_converted

        torch.set_num_threads(threads)
        folder = ensure_converted(model_name)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def scores(self, passages: str, question: str, candidates: list[str]) -> list[tuple[float, float]]:
        """(sum, mean) log-probability of each candidate's tokens after the chat prompt."""
        torch = self.torch
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Passages:\n{passages}\n\nQuestion: {question}"}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        found = []
        with torch.no_grad():
            for candidate in candidates:
                ids = self.tokenizer(candidate, add_special_tokens=False, return_tensors="pt").input_ids
                logits = self.model(torch.cat([prompt_ids, ids], 1)).logits[0, prompt_ids.shape[1] - 1:-1]
                logprobs = torch.log_softmax(logits.float(), -1).gather(1, ids[0][:, None]).squeeze(1)
                found.append((logprobs.sum().item(), logprobs.mean().item()))
        return found


def tally(scorer: CandidateScorer, items: list[tuple[str, str, list[str], str]]) -> dict:
    """Right picks by sum / mean log-probability and by position, over (passages, question, candidates, gold)."""
    from apexdsp.metrics.answer import normalize_answer

    right = {"by_sum": 0, "by_mean": 0, "first_candidate": 0}
    for passages, question, candidates, gold in items:
        scored = scorer.scores(passages, question, candidates)
        gold = normalize_answer(gold)
        for name, index in (("by_sum", 0), ("by_mean", 1)):
            best = max(range(len(candidates)), key=lambda i: scored[i][index])
            right[name] += normalize_answer(candidates[best]) == gold
        right["first_candidate"] += normalize_answer(candidates[0]) == gold
    return {"n": len(items), **right}


def choice_items(path: str, limit: int) -> list[tuple[str, str, list[str], str]]:
    from apexdsp.data.loaders import read_questions
    from apexdsp.data.records import Passage
    from apexdsp.indexes.baselines import BM25Retriever
    from apexdsp.indexes.corpus import Corpus
    from apexdsp.metrics.answer import normalize_answer
    from apexdsp.programs.evidence import format_passages
    from apexdsp.programs.question_forms import choice_options

    items = []
    for question in read_questions(path, limit=limit):
        options = choice_options(question.question)
        if options is None or normalize_answer(question.answer) not in {normalize_answer(o) for o in options}:
            continue
        corpus = Corpus(passages=[Passage(id=f"p{i}", title=p.title, text=p.text)
                                  for i, p in enumerate(question.paragraphs)])
        hits = BM25Retriever(corpus).search(question.question, k=5)
        items.append((format_passages(hits, 300), question.question, list(options), question.answer))
    return items


def open_items(run_path: str) -> list[tuple[str, str, list[str], str]]:
    from apexdsp.metrics.answer import normalize_answer
    from apexdsp.programs.evidence import evidence_pool, format_passages
    from apexdsp.programs.question_forms import choice_options, is_yes_no_question
    from apexdsp.programs.trajectory import Trajectory

    with open(run_path) as handle:
        rows = json.load(handle)["results"]
    items = []
    for row in rows:
        if row.get("trajectory") is None or choice_options(row["question"]) or is_yes_no_question(row["question"]):
            continue
        pool = evidence_pool(Trajectory.model_validate(row["trajectory"]), 5)  # what the answer step saw
        titles = list(dict.fromkeys(p.title for p in pool))
        if normalize_answer(row["gold"]) in {normalize_answer(t) for t in titles}:
            items.append((format_passages(pool, 300), row["question"], titles, row["gold"]))
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["choice", "open"])
    parser.add_argument("--questions", help="choice: a shared-format question file")
    parser.add_argument("--limit", type=int, default=1200, help="choice: questions read from the file")
    parser.add_argument("--run", help="open: an apexdsp evaluate report (JSON)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if (args.check == "choice") != bool(args.questions) or (args.check == "open") != bool(args.run):
        parser.error("choice needs --questions, open needs --run")
    items = choice_items(args.questions, args.limit) if args.check == "choice" else open_items(args.run)
    started = time.perf_counter()
    result = tally(CandidateScorer(args.model, args.threads), items)
    print(json.dumps({"check": args.check, **result, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
