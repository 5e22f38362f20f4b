"""Local LM throughput through DSPy: one request at a time versus concurrent requests batched.

The same HotpotQA questions go through ``dspy.Predict`` twice: one call after another, then as
``Predict.batch(..., num_threads=8)`` (what ``Evaluate(num_threads=8)`` does). Every completion is forced to
exactly ``--max-tokens`` tokens (EOS banned with ``logit_bias``), so the two modes decode the same number
of tokens and tokens/s compare like for like. The rounds alternate the two modes so that a change in the
load of this shared machine hits both. Prints the figures (or JSON with ``--json``) and writes them to
``--out`` atomically.

    .venv/bin/python benchmarks/lm_throughput.py --threads 2 --out .apexdsp/bench/lm_throughput.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On this shared 2-core machine
# spinning threads fight every other process for the cores; measured here, the LM tests ran 3.5x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from apexdsp.paths import configure_environment, shared_data_dir  # noqa: E402

configure_environment()

import dspy  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from apexdsp.data.loaders import read_questions  # noqa: E402
from apexdsp.lm.adapter import TolerantChatAdapter  # noqa: E402
from apexdsp.lm.engine import EngineConfig  # noqa: E402
from apexdsp.lm.registry import get_lm  # noqa: E402

console = Console(stderr=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", default="smollm2-135m", help="local model name or folder")
    parser.add_argument("--requests", type=int, default=16, help="questions per mode and round")
    parser.add_argument("--concurrency", type=int, default=8, help="threads in the concurrent mode")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per request (EOS banned)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating single/concurrent rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="auto: bfloat16 where the CPU has native bf16 instructions (the engine default)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON result here (atomically)")
    return parser.parse_args(argv)


def load_questions(count: int) -> list[str]:
    """The first ``count`` HotpotQA dev questions (the project's real inputs)."""
    return [q.question for q in read_questions(shared_data_dir() / "hotpotqa" / "dev.jsonl", limit=count)]


class Bench:
    """Runs one mode over the questions and measures the engine's own token counts."""

    def __init__(self, args: argparse.Namespace) -> None:
        config = EngineConfig(dtype=args.dtype, num_threads=args.threads, max_batch_size=args.max_batch_size)
        lm = get_lm(args.lm, cache=False, temperature=0.0, max_tokens=args.max_tokens, engine_config=config)
        self.engine = lm.engine
        # Banning every end token makes each completion exactly max_tokens long in both modes.
        self.lm = lm.copy(logit_bias={str(token): -100 for token in sorted(self.engine.eos_ids())})
        self.predict = dspy.Predict("question -> answer")
        self.concurrency = args.concurrency

    def run(self, questions: list[str], concurrent: bool, progress: Progress) -> dict:
        self.engine.reset_stats()
        label = f"{self.concurrency} concurrent" if concurrent else "one at a time"
        task = progress.add_task(label, total=len(questions))
        started = time.perf_counter()
        with dspy.context(lm=self.lm, adapter=TolerantChatAdapter()):
            if concurrent:
                examples = [dspy.Example(question=q).with_inputs("question") for q in questions]
                # timeout=0: no straggler re-submission, which would decode a slow request twice.
                self.predict.batch(examples, num_threads=self.concurrency, disable_progress_bar=True, timeout=0)
                progress.update(task, completed=len(questions))
            else:
                for question in questions:
                    self.predict(question=question)
                    progress.advance(task)
        seconds = time.perf_counter() - started
        stats = self.engine.stats()
        progress.remove_task(task)
        return {
            "mode": "concurrent" if concurrent else "single",
            "requests": stats.requests,
            "completion_tokens": stats.completion_tokens,
            "prompt_tokens": stats.prompt_tokens,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(stats.completion_tokens / seconds, 2),
            "mean_rows_per_step": stats.as_dict()["mean_rows_per_step"],
            "prefill_seconds": round(stats.prefill_seconds, 2),
            "decode_seconds": round(stats.decode_seconds, 2),
            "decode_steps": sum(stats.step_sizes.values()),
            "prefix_tokens_reused": stats.prefix_tokens_reused,
            "largest_batch": stats.largest_batch,
            "loadavg_after": os.getloadavg()[0],
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("dspy.clients.lm").setLevel(logging.ERROR)  # every completion is cut on purpose
    questions = load_questions(args.requests)
    bench = Bench(args)
    load_before = os.getloadavg()
    with Progress(console=console, transient=True) as progress:
        bench.run(questions[:2], concurrent=False, progress=progress)  # warm-up: weights, kernels
        rounds = []
        for _ in range(args.rounds):
            rounds.append(bench.run(questions, concurrent=False, progress=progress))
            rounds.append(bench.run(questions, concurrent=True, progress=progress))

    def total(mode: str) -> dict:
        runs = [r for r in rounds if r["mode"] == mode]
        tokens, seconds = sum(r["completion_tokens"] for r in runs), sum(r["seconds"] for r in runs)
        return {"completion_tokens": tokens, "seconds": round(seconds, 3),
                "tokens_per_second": round(tokens / seconds, 2)}

    single, concurrent = total("single"), total("concurrent")
    expected = args.requests * args.max_tokens
    result = {
        "model": args.lm,
        "dtype": bench.engine.dtype,
        "torch_threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests_per_mode_and_round": args.requests,
        "every_completion_full_length": all(r["completion_tokens"] == expected for r in rounds),
        "single": single,
        "concurrent": concurrent,
        "ratio": round(concurrent["tokens_per_second"] / single["tokens_per_second"], 2),
        "rounds": rounds,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if args.out:
        write_atomically(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


def write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(data, handle, indent=2)
    os.replace(handle.name, path)


def report(result: dict) -> None:
    out = Console()
    out.print(f"[bold]{result['model']}[/] {result['dtype']}, {result['torch_threads']} torch threads, "
              f"{result['max_tokens']} tokens per request, {result['requests_per_mode_and_round']} requests "
              f"x {len(result['rounds']) // 2} rounds per mode")
    for row in result["rounds"]:
        out.print(f"  {row['mode']:<10} {row['tokens_per_second']:>8.1f} tokens/s  {row['seconds']:>7.1f}s  "
                  f"rows/step {row['mean_rows_per_step']:<5} prefill {row['prefill_seconds']:>5.1f}s "
                  f"decode {row['decode_seconds']:>5.1f}s / {row['decode_steps']} steps  load {row['loadavg_after']:.2f}")
    out.print(f"single     {result['single']['tokens_per_second']:>8.1f} tokens/s")
    out.print(f"concurrent {result['concurrent']['tokens_per_second']:>8.1f} tokens/s "
              f"({result['concurrency']} threads)")
    out.print(f"[bold]ratio      {result['ratio']:.2f}x[/]   peak RSS {result['peak_rss_mb']} MB   "
              f"load average {result['loadavg_before']} -> {result['loadavg_after']}")


if __name__ == "__main__":
    sys.exit(main())
