"""Seconds per GRPO step, and where they go, for one module of a program on HotpotQA train questions.

Runs :class:`apexdsp.optimizers.grpo.ModuleGRPO` for a few steps on the real stack (SmolLM2-135M, the
ColBERT index, the module's real reward) and prints the per-step split that ``TimedGRPOTrainer``
records: generation, reward, log-probability scoring, loss + backward. Writes the figures as JSON to
``--out`` (atomically) with the load average before and after, since the CPU is shared.

    .venv/bin/python benchmarks/grpo_step.py --program apex --module planner.write_plan \\
        --index .apexdsp/indexes/hotpotqa --prompts 4 --generations 4 --tokens 64 --steps 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from apexdsp.paths import configure_environment, shared_data_dir  # noqa: E402

configure_environment()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="apex")
    parser.add_argument("--module", default="planner.write_plan")
    parser.add_argument("--reward", default=None, help="module reward (default: the module's default)")
    parser.add_argument("--index", type=Path, default=Path(".apexdsp/indexes/hotpotqa"))
    parser.add_argument("--lm", default="smollm2-135m")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no",
                        help="bf16: float32 weights, forward and backward under bfloat16 autocast")
    parser.add_argument("--rollout-engine", choices=["transformers", "apexdsp"], default="transformers",
                        help="who samples the completions: TRL's model.generate, or the local engine's decoder")
    parser.add_argument("--out", type=Path, default=Path(".apexdsp/bench/grpo_step.json"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from apexdsp.data.loaders import read_questions
    from apexdsp.indexes import load_retriever
    from apexdsp.optimizers.grpo import ModuleGRPO
    from apexdsp.optimizers.grpo_config import ModuleGRPOConfig
    from apexdsp.optimizers.module_rewards import DEFAULT_MODULE_REWARDS
    from apexdsp.programs.registry import build_program
    from apexdsp.runtime import configure_dspy
    from apexdsp.tracking.run import write_json_atomic

    load_before = os.getloadavg()
    retriever = load_retriever(args.index)
    configure_dspy(args.lm)
    program = build_program(args.program, retriever=retriever)
    questions = read_questions(shared_data_dir() / "hotpotqa" / "train.jsonl")[: args.questions]
    config = ModuleGRPOConfig(prompts_per_step=args.prompts, num_generations=args.generations,
                              max_completion_length=args.tokens, max_steps=args.steps, save_steps=10_000,
                              beta=args.beta, num_threads=args.threads, resume=False,
                              mixed_precision=args.mixed_precision, rollout_engine=args.rollout_engine)
    with tempfile.TemporaryDirectory(prefix="grpo-bench-") as out:
        optimizer = ModuleGRPO(out, config, module=args.module,
                               reward=args.reward or DEFAULT_MODULE_REWARDS[args.module], retriever=retriever)
        started = time.perf_counter()
        optimizer.compile(program, trainset=questions)
        total = time.perf_counter() - started
    result = optimizer.result
    figures = {"program": args.program, "module": args.module, "lm": args.lm, "prompts_per_step": args.prompts,
               "num_generations": args.generations, "max_completion_length": args.tokens, "steps": result.steps,
               "total_seconds": total, "train_seconds": result.seconds, "timing_per_step": result.timing,
               "reward_first": result.reward_first, "reward_last": result.reward_last, "zero_std": result.zero_std,
               "threads": args.threads, "mixed_precision": args.mixed_precision, "rollout_engine": args.rollout_engine,
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    write_json_atomic(figures, args.out)
    for key, value in figures.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
