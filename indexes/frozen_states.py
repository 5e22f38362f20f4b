"""Run the frozen lower layers of the encoder once per text and keep their outputs.

Training updates only the top ``train_layers`` transformer layers and the projection. The layers below
never change, so their output for a given text never changes either: computing it once and caching it
(fp16, about 1 GB for 10k passages) turns every training step from a full 6-layer forward and backward
pass into one through the top layers only. On two CPU cores that is the difference between hours and
minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CachedText:
    """The frozen-layer output for one tokenised text: its tokens, attention mask and states (fp16)."""

    input_ids: torch.Tensor  # (length,) int64
    attention_mask: torch.Tensor  # (length,) int64
    states: torch.Tensor  # (length, hidden) float16


def lower_layers(bert, input_ids: torch.Tensor, attention_mask: torch.Tensor, upto: int) -> torch.Tensor:
    """Embeddings followed by transformer layers ``[0, upto)`` (bit-identical to the full model's path)."""
    hidden = bert.embeddings(input_ids=input_ids)
    extended = bert.get_extended_attention_mask(attention_mask, input_ids.shape)
    for layer in bert.encoder.layer[:upto]:
        hidden = layer(hidden, attention_mask=extended)[0]
    return hidden


def upper_layers(bert, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Transformer layers ``[start, n)`` on cached states: the trainable part of the encoder."""
    extended = bert.get_extended_attention_mask(attention_mask, attention_mask.shape)
    for layer in bert.encoder.layer[start:]:
        hidden = layer(hidden, attention_mask=extended)[0]
    return hidden


def cache_texts(bert, tokenized: tuple[torch.Tensor, torch.Tensor], upto: int, full_width: bool = False,
                batch_size: int = 32, progress=None) -> list[CachedText]:
    """Frozen-layer outputs for already tokenised texts ``(ids, mask)``, in input order.

    Documents keep only their real tokens. Queries (``full_width``) keep every position: ColBERT pads
    them with [MASK] tokens that are not attended to but are encoded (query augmentation). Texts are
    processed in length order so that a batch carries little padding; ``progress`` is called with the
    number of texts done after each batch.
    """
    input_ids, attention_mask = tokenized
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    cached: list[CachedText | None] = [None] * len(order)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = input_ids.shape[1] if full_width else int(lengths[batch].max())
            ids, mask = input_ids[batch, :width], attention_mask[batch, :width]
            states = lower_layers(bert, ids, mask, upto)
            for row, index in enumerate(batch):
                keep = width if full_width else int(lengths[index])
                cached[index] = CachedText(ids[row, :keep].clone(), mask[row, :keep].clone(),
                                           states[row, :keep].to(torch.float16).clone())
            if progress is not None:
                progress(len(batch))
    return cached  # type: ignore[return-value]


def pad_batch(items: list[CachedText]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack cached texts into ``(ids, float32 states, attention mask)`` padded to the longest."""
    width = max(item.input_ids.numel() for item in items)
    hidden = items[0].states.shape[-1]
    ids = torch.zeros(len(items), width, dtype=torch.long)
    states = torch.zeros(len(items), width, hidden, dtype=torch.float32)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for row, item in enumerate(items):
        n = item.input_ids.numel()
        ids[row, :n] = item.input_ids
        states[row, :n] = item.states.float()
        mask[row, :n] = item.attention_mask
    return ids, states, mask
