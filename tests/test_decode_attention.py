"""The decoding-step attention agrees with transformers' SDPA path, also on keys that are cache views."""

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from apexdsp.lm.attention import decode_attention

BATCH, KV_HEADS, GROUP, DIM, KEYS, CAPACITY = 4, 3, 3, 16, 20, 32


def _module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = GROUP, True, False
    return module


@pytest.mark.parametrize("as_cache_view", [False, True])
def test_one_token_attention_matches_sdpa_with_a_padding_mask(as_cache_view):
    torch.manual_seed(0)
    query = torch.randn(BATCH, KV_HEADS * GROUP, 1, DIM)
    if as_cache_view:  # as the in-place KV cache hands them over: the filled part of a larger buffer
        keys = torch.randn(BATCH, KV_HEADS, CAPACITY, DIM)[:, :, :KEYS]
        values = torch.randn(BATCH, KV_HEADS, CAPACITY, DIM)[:, :, :KEYS]
        assert not keys.is_contiguous()
    else:
        keys, values = torch.randn(BATCH, KV_HEADS, KEYS, DIM), torch.randn(BATCH, KV_HEADS, KEYS, DIM)
    mask = torch.ones(BATCH, 1, 1, KEYS, dtype=torch.bool)
    mask[1, :, :, :7] = False  # left padding of a shorter row
    mask[2, :, :, 3:5] = False  # padding in the middle: [shared prefix | padding | own tokens]

    ours, _ = decode_attention(_module(), query, keys, values, mask, scaling=DIM**-0.5)
    reference, _ = sdpa_attention_forward(_module(), query, keys, values, mask, scaling=DIM**-0.5)

    assert ours.shape == (BATCH, 1, KV_HEADS * GROUP, DIM)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_a_masked_key_has_no_influence():
    torch.manual_seed(1)
    query = torch.randn(1, KV_HEADS * GROUP, 1, DIM)
    keys, values = torch.randn(1, KV_HEADS, KEYS, DIM), torch.randn(1, KV_HEADS, KEYS, DIM)
    mask = torch.ones(1, 1, 1, KEYS, dtype=torch.bool)
    mask[..., 0] = False
    before, _ = decode_attention(_module(), query, keys, values, mask)
    keys[:, :, 0], values[:, :, 0] = 100.0, -100.0
    after, _ = decode_attention(_module(), query, keys, values, mask)
    torch.testing.assert_close(before, after)
