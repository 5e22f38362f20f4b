"""A decoding-step attention for grouped-query models on CPU, registered with transformers.

Profiling a batched decoding step of SmolLM2 (3 KV heads serving 9 query heads) showed two costs that
have nothing to do with the model's arithmetic. With a padding mask present, transformers' SDPA path
copies every layer's whole KV cache three times over to expand the KV heads (``repeat_kv``), about 15 % of
the step in float32; and torch's CPU flash-attention kernel, tuned for long queries, spent 2.6 ms per
call on a one-token query in bfloat16, 45 % of the step. For a one-token query the attention is two small
batched matrix products: grouping the query heads by their KV head needs no copy at all. Longer queries
(the prefill) and unpadded batches (no mask: SDPA then groups the heads itself) keep transformers' path.

The scores are computed as ``keys @ queries^T`` and then transposed (a view), not as ``queries @ keys^T``.
torch's bfloat16 batched product copies an operand that is not laid out as plain matrices; the keys are
views of the in-place cache buffer (:mod:`apexdsp.lm.kv_cache`), and their transpose was copied whole, in
every layer of every decoding step: 29 % of a 16-row step over 560 cached columns (torch profiler).
Multiplied the other way round the keys are read as they lie, and the attention of that
step takes 1.0-1.4 ms a layer instead of 2.3-3.0 (benchmarks/lm_batch_scaling.py has the whole-engine figure).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "apexdsp_decode"


def decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Same contract as ``sdpa_attention_forward``: returns ``[batch, query_len, heads, head_dim]``."""
    batch, heads, length, dim = query.shape
    if length != 1 or attention_mask is None or dropout or kwargs.get("output_attentions") or heads % key.shape[1]:
        # Without a padding mask transformers already calls SDPA with enable_gqa (no copy), which is fast.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    kv_heads = key.shape[1]
    # repeat_kv semantics: KV head j serves query heads j*group .. j*group + group - 1.
    grouped = query.view(batch, kv_heads, heads // kv_heads, dim)
    # [batch, kv_heads, keys, group] -> [batch, kv_heads, group, keys]: keys read in place (see above)
    scores = torch.matmul(key, grouped.transpose(-1, -2)).transpose(-1, -2)
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if attention_mask is not None:  # [batch, 1, 1, keys]: bool (True = attend) or additive float
        mask = attention_mask[:, :, :, : key.shape[-2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # [batch, kv_heads, group, dim]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(NAME, decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
