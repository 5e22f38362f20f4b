"""GRPO rollouts through apexdsp's batching decoder instead of ``model.generate``.

A GRPO step samples ``num_generations`` completions of each prompt. TRL's transformers path left-pads all
of them into one ``generate`` call: every copy of a prompt is prefilled again, and a row that has finished
keeps being computed until the longest is done. :class:`~apexdsp.lm.generation.DecodeBatch`, the loop
behind the local LM engine, prefills a prompt once for its whole group (the copies share that prefix's KV
states), drops a row from the batch when it ends, and samples each row with the trainer's settings. It
decodes with the weights being trained (the very module, no copy and no weight sync), inside TRL's own
``unwrap_model_for_generation``, so gradient checkpointing and autocast are handled as in TRL's path.

Plugged in through TRL's ``rollout_func`` (``ModuleGRPOConfig.rollout_engine = "apexdsp"``); the prompts
are tokenized by the trainer itself, so what is sampled is exactly what TRL's own path would sample from.
vLLM (``use_vllm``) keeps TRL's path: it is the engine for GPUs.
"""

from __future__ import annotations

from typing import Any

from apexdsp.errors import ApexError
from apexdsp.lm.generation import DecodeBatch, Row, SamplingParams


class EngineRollout:
    """``rollout_func(prompts, trainer)`` for ``trl.GRPOTrainer``: completions from :class:`DecodeBatch`.

    TRL hands over the step's prompts as its sampler repeated them (each prompt ``num_generations``
    times in a row); one completion is returned per prompt given, with ``logprobs`` left to TRL (it
    computes the old policy's log-probabilities itself when the loss needs them). The sampling settings
    are read from the trainer's own ``GRPOConfig`` at every call, so the two paths cannot drift apart.
    """

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        import torch
        from trl.models import unwrap_model_for_generation

        params = sampling_params(trainer.args)
        prompt_ids, _, _ = trainer._tokenize_prompts(prompts)  # TRL's own chat templating (prefilled headers)
        tokenizer = trainer.processing_class
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with (unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator,
                                          gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                                          gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
              as model, torch.no_grad()):
            rows = generate(model, tokenizer, [list(ids) for ids in prompt_ids], params, pad,
                            eos_id=tokenizer.eos_token_id)
        return {"prompt_ids": [row.prompt_ids for row in rows],
                "completion_ids": [row.generated for row in rows],  # EOS kept, as TRL's own path keeps it
                "logprobs": None}


def sampling_params(args: Any) -> SamplingParams:
    """TRL's sampling settings as the decoder's; settings it has no equivalent for are refused."""
    unsupported = [name for name, used in (("min_p", bool(args.min_p)),
                                           ("repetition_penalty", args.repetition_penalty != 1.0),
                                           ("generation_kwargs", bool(args.generation_kwargs))) if used]
    if unsupported:
        raise ApexError(f"rollout_engine='apexdsp' does not sample with {', '.join(unsupported)}; "
                        "use rollout_engine='transformers' for them")
    return SamplingParams(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k or 0)


def generate(model: Any, tokenizer: Any, prompt_ids: list[list[int]], params: SamplingParams, pad_id: int,
             eos_id: int) -> list[Row]:
    """Decode one row per prompt (identical prompts share their prefill); rows come back in prompt order.

    Only the tokenizer's EOS ends a row, as in TRL (``align_end_of_turn`` made it the end of the turn).
    """
    distinct = len({tuple(ids) for ids in prompt_ids})
    batch = DecodeBatch(model, tokenizer, {eos_id}, pad_id, prefix_cache_size=max(1, distinct))
    rows = [Row(ids, params, prefix_len=len(ids) - 1) for ids in prompt_ids]
    batch.add(rows)
    while len(batch):
        batch.step()
    return rows


__all__ = ["EngineRollout", "generate", "sampling_params"]
