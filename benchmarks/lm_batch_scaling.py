"""Does a larger batch make the local LM faster? Tokens/s by batch size, on prompts the size of a reader's.

``lm_throughput.py`` measures short prompts (a bare question). The programs' calls are longer: a reader's
prompt carries its retrieved passages (about 550 tokens each, most of them the call's own). Here every
request is ``context, question -> answer`` with four of the question's own HotpotQA paragraphs, and the
engine runs ``2 x batch`` such requests with ``batch`` threads and ``max_batch_size = batch``, each
forced to ``--max-tokens`` completion tokens (EOS banned). Batch sizes alternate within each round so a
change in the machine's load hits all of them. The engine's own counters split the time into prefill
(compute-bound: it gains nothing from rows) and decoding (a step reads every weight once, whatever the
rows), which is what decides whether raising an evaluation's ``threads`` pays.

    .venv/bin/python benchmarks/lm_batch_scaling.py --sizes 8,16,32,64 --out .apexdsp/bench/lm_batch_scaling.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in lm_throughput.py: idle OpenMP threads sleep

from apexdsp.paths import configure_environment, shared_data_dir  # noqa: E402

configure_environment()

import dspy  # noqa: E402
from rich.progress import Progress  # noqa: E402

from apexdsp.data.loaders import read_questions  # noqa: E402
from apexdsp.lm.adapter import TolerantChatAdapter  # noqa: E402
from apexdsp.lm.engine import EngineConfig  # noqa: E402
from apexdsp.lm.registry import get_lm  # noqa: E402
from apexdsp.tracking.run import write_json_atomic  # noqa: E402

PASSAGES, PASSAGE_CHARS = 4, 400


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--sizes", default="8,16,32,64", help="batch sizes (threads = max_batch_size)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens decoded per request (EOS banned)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prefill-padding", default=None,
                        help="comma-separated EngineConfig.max_prefill_padding values to compare (1 = one pass "
                             "per prefix group, the earlier behaviour); default: the engine's own")
    parser.add_argument("--out", type=Path, help="also write the JSON result here (atomically)")
    return parser.parse_args(argv)


def reader_examples(count: int, offset: int) -> list[dspy.Example]:
    """HotpotQA dev questions, each with four of its own paragraphs as the context."""
    questions = read_questions(shared_data_dir() / "hotpotqa" / "dev.jsonl")
    picked = [questions[(offset + i) % len(questions)] for i in range(count)]
    return [dspy.Example(question=q.question,
                         context="\n".join(f"[{j + 1}] {p.title}: {p.text[:PASSAGE_CHARS]}"
                                           for j, p in enumerate(q.paragraphs[:PASSAGES])))
            .with_inputs("context", "question") for q in picked]


def measure(lm: dspy.LM, batch: int, examples: list[dspy.Example]) -> dict:
    engine, predict = lm.engine, dspy.Predict("context, question -> answer")
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        predict.batch(examples[:2], num_threads=2, disable_progress_bar=True, timeout=0)  # warm-up
        engine.reset_stats()
        started = time.perf_counter()
        predict.batch(examples, num_threads=batch, disable_progress_bar=True, timeout=0)
        seconds = time.perf_counter() - started
    stats = engine.stats()
    return {"batch": batch, "requests": stats.requests, "seconds": round(seconds, 1),
            "tokens_per_second": round(stats.completion_tokens / seconds, 1),
            "decode_tokens_per_second": round(stats.completion_tokens / stats.decode_seconds, 1),
            "prompt_tokens_per_request": stats.prompt_tokens // max(stats.requests, 1),
            "rows_per_step": round(stats.rows_per_step, 1), "prefill_seconds": round(stats.prefill_seconds, 1),
            "prefill_padding": round(stats.prefill_padding / stats.prefill_slots, 3) if stats.prefill_slots else 0.0,
            "decode_seconds": round(stats.decode_seconds, 1), "load_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # every completion is cut on purpose
    sizes = [int(size) for size in args.sizes.split(",")]
    paddings = ([float(p) for p in args.prefill_padding.split(",")] if args.prefill_padding
                else [EngineConfig().max_prefill_padding])
    lms = {}
    for size in sizes:  # one engine per setting (engines are shared per config): each keeps its own limits
        for padding in paddings:
            lm = get_lm(args.lm, cache=False, temperature=0.0, max_tokens=args.max_tokens,
                        engine_config=EngineConfig(max_batch_size=size, max_prefill_padding=padding))
            lms[size, padding] = lm.copy(logit_bias={str(token): -100 for token in sorted(lm.engine.eos_ids())})
    rows = []
    with Progress(transient=True) as progress:
        task = progress.add_task("settings", total=len(lms) * args.rounds)
        for round_index in range(args.rounds):
            for (size, padding), lm in lms.items():
                examples = reader_examples(2 * size, 37 * round_index)
                rows.append({"round": round_index, "max_prefill_padding": padding, **measure(lm, size, examples)})
                progress.console.print(json.dumps(rows[-1]), soft_wrap=True)
                progress.advance(task)
    result = {"model": args.lm, "max_tokens": args.max_tokens, "passages": PASSAGES, "rows": rows}
    if args.out:
        write_json_atomic(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
