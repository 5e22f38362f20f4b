"""Batched decoding with per-row sampling settings, rows that join and leave between steps.

Why not ``model.generate``: one ``generate`` call takes one temperature, one ``max_new_tokens`` and one
set of stop strings for the whole batch, keeps computing rows that have finished, and cannot take a new
row until every row is done. Requests that DSPy sends from several threads differ in all of these. The
loop here keeps one KV cache for the running rows (left-padded, so every row's next token sits in the
last column), samples each row with its own settings, drops a row from the cache as soon as it ends
(EOS, stop string, token budget) and prefills newly arrived rows and splices them in between two steps
(continuous batching). A decoding step reads every weight once whatever the number of rows: measured
on this 2-core CPU, a step over eight rows of SmolLM2 costs about twice a step over one.

Prefill, by contrast, is compute-bound and gains nothing from batching; but every call of one DSPy
predictor starts with the same system message and demos. The KV states of such a shared prefix are kept
(a small LRU keyed by its tokens) and reused, so a call prefills only its own last message. Rows are then
laid out as ``[prefix | padding | own tokens]``: positions and the attention mask are explicit per row,
so padding in the middle is as harmless as padding on the left.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from apexdsp.lm.kv_cache import buffered_cache, keep_rows, left_pad, splice_rows

FinishReason = Literal["stop", "length"]
PrefixStates = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of shape [1, H, K, D]

MIN_PREFIX_TOKENS = 16  # shorter shared prefixes are not worth a cache entry
MAX_PREFILL_PADDING = 0.05  # a prefill pass may spend at most this share of its token slots on padding


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is drawn. ``temperature == 0`` means greedy (argmax) decoding."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    stop: tuple[str, ...] = ()
    seed: int | None = None  # a seeded row draws from its own generator: reproducible whatever its batch
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI semantics; -100 bans a token (e.g. EOS)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    """One finished row: the text (stop string and EOS removed) and the token counts for usage."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass
class Row:
    """A sequence being decoded; ``ticket`` is whatever the caller needs to deliver the result."""

    prompt_ids: list[int]
    params: SamplingParams
    ticket: Any = None
    prefix_len: int = 0  # leading prompt tokens that other calls share (system message, demos)
    generated: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    text: str | None = None
    generator: torch.Generator | None = None

    def completion(self) -> Completion:
        assert self.finish_reason is not None and self.text is not None
        return Completion(self.text, len(self.prompt_ids), len(self.generated), self.finish_reason)


class DecodeBatch:
    """The rows decoding together and their shared KV cache. Owned by one thread (not thread-safe)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, eos_ids: set[int], pad_id: int,
                 prefix_cache_size: int = 8, max_prefill_padding: float = MAX_PREFILL_PADDING) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.prefix_cache_size = prefix_cache_size
        self.max_prefill_padding = max_prefill_padding
        self.prefixes: OrderedDict[tuple[int, ...], PrefixStates] = OrderedDict()
        self.prefix_tokens_reused = 0
        self.cache_cells = 0  # over decoding steps: rows x cache columns the attention read ...
        self.padding_cells = 0  # ... of which padding (rows are padded to the longest)
        self.prefill_slots = 0  # over prefill passes: rows x own-token columns computed ...
        self.prefill_padding = 0  # ... of which padding
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length], 1 where a real token sits
        self.positions: torch.Tensor | None = None  # [rows] position id of each row's pending token
        self.pending: torch.Tensor | None = None  # [rows, 1] sampled token not yet in the cache

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> list[Row]:
        """Forget every row (after an error); returns them so their callers can be told."""
        rows = self.rows
        self._reset()
        return rows

    @torch.inference_mode()
    def add(self, rows: list[Row]) -> list[Row]:
        """Prefill ``rows`` and splice them into the running batch; returns rows already finished."""
        for row in rows:
            if row.params.seed is not None:
                row.generator = torch.Generator(device=self.device).manual_seed(row.params.seed)
        groups: dict[tuple[int, ...], list[Row]] = {}
        for row in rows:
            shared = MIN_PREFIX_TOKENS <= row.prefix_len < len(row.prompt_ids) and self.prefix_cache_size > 0
            groups.setdefault(tuple(row.prompt_ids[: row.prefix_len]) if shared else (), []).append(row)
        finished: list[Row] = []
        for prefix, group in groups.items():
            for bucket in length_buckets(group, len(prefix), self.max_prefill_padding):
                finished += self._prefill(bucket, prefix)
        return finished

    def _prefill(self, rows: list[Row], prefix: tuple[int, ...]) -> list[Row]:
        """One forward pass over the rows' own tokens, on top of the shared prefix's cached states."""
        k = len(prefix)
        width = max(len(row.prompt_ids) - k for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        own = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            tail = row.prompt_ids[k:]
            ids[i, width - len(tail):] = torch.tensor(tail)
            own[i, width - len(tail):] = 1
        self.prefill_slots += own.numel()
        self.prefill_padding += own.numel() - int(own.sum())
        mask = torch.cat([torch.ones((len(rows), k), dtype=torch.long), own], dim=1).to(self.device)
        positions = (k + own.cumsum(-1) - 1).clamp(min=0).to(self.device)
        cache = buffered_cache()
        if k:
            self.prefix_tokens_reused += k * len(rows)
            for index, (keys, values) in enumerate(self._prefix_states(prefix)):
                cache.update(keys.expand(len(rows), -1, -1, -1), values.expand(len(rows), -1, -1, -1), index)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = self._sample(out.logits[:, -1, :], rows)
        self._splice(rows, cache, mask, mask.sum(-1), tokens)
        return self._record(rows, tokens)

    def _prefix_states(self, prefix: tuple[int, ...]) -> PrefixStates:
        """The cached KV states of ``prefix`` (computed alone, positions 0..K-1, on first use)."""
        states = self.prefixes.get(prefix)
        if states is not None:
            self.prefixes.move_to_end(prefix)
            return states
        cache = DynamicCache()
        self.model(input_ids=torch.tensor([prefix], device=self.device), past_key_values=cache, use_cache=True,
                   position_ids=torch.arange(len(prefix), device=self.device)[None], logits_to_keep=1)
        states = [(layer.keys, layer.values) for layer in cache.layers]  # plain layers: exact-size tensors
        self.prefixes[prefix] = states
        if len(self.prefixes) > self.prefix_cache_size:
            self.prefixes.popitem(last=False)
        return states

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One decoding step for every running row; returns the rows that finished on it."""
        assert self.cache is not None and self.mask is not None and self.pending is not None
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.cache_cells += self.mask.numel()
        self.padding_cells += self.mask.numel() - int(self.mask.sum())
        out = self.model(input_ids=self.pending, attention_mask=self.mask,
                         position_ids=self.positions[:, None], past_key_values=self.cache, use_cache=True)
        self.positions = self.positions + 1
        tokens = self._sample(out.logits[:, -1, :], self.rows)
        self.pending = tokens[:, None]
        return self._record(self.rows, tokens)

    # -- internals -------------------------------------------------------------------------------

    def _splice(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor,
                tokens: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running ones, left-padding the shorter cache."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = list(rows), cache, mask, positions
            self.pending = tokens[:, None]
            return
        assert self.cache is not None and self.mask is not None
        width = max(self.mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
        splice_rows(self.cache, cache, old_pad, new_pad)
        self.mask = torch.cat([left_pad(self.mask, old_pad), left_pad(mask, new_pad)])
        self.positions = torch.cat([self.positions, positions])
        self.pending = torch.cat([self.pending, tokens[:, None]])
        self.rows.extend(rows)

    def _record(self, rows: list[Row], tokens: torch.Tensor) -> list[Row]:
        """Append each row's new token, decide which rows end, drop them from the batch."""
        finished: list[Row] = []
        for row, token in zip(rows, tokens.tolist(), strict=True):
            row.generated.append(token)
            if self._finish(row, token):
                finished.append(row)
        if finished:
            keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
            self._keep(keep)
        return finished

    def _finish(self, row: Row, token: int) -> bool:
        params = row.params
        if token in self.eos_ids:
            row.finish_reason, row.text = "stop", self._decode(row.generated[:-1])
            return True
        if params.stop:
            text = self._decode(row.generated)
            hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
            if hits:
                row.finish_reason, row.text = "stop", text[: min(hits)]
                return True
        total = len(row.prompt_ids) + len(row.generated)
        if len(row.generated) >= params.max_tokens or (self.max_positions and total >= self.max_positions):
            row.finish_reason, row.text = "length", self._decode(row.generated)
            return True
        return False

    def _keep(self, keep: list[int]) -> None:
        if not keep:
            self._reset()
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.pending = self.mask[index], self.positions[index], self.pending[index]
        # Leading columns that are padding for every remaining row are dead weight in each attention step.
        first = int(self.mask.any(dim=0).nonzero()[0])
        keep_rows(self.cache, index, first)
        self.mask = self.mask[:, first:]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Next token per row: greedy where temperature is 0, else temperature / top-k / top-p sampling."""
        logits = logits.float()
        for i, row in enumerate(rows):
            for token, bias in row.params.logit_bias:
                logits[i, token] += bias
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, row in enumerate(rows) if row.params.temperature > 0]
        if not sampled:
            return tokens
        picked = logits[sampled] / torch.tensor([rows[i].params.temperature for i in sampled],
                                                device=logits.device)[:, None]
        picked = _top_k(picked, [rows[i].params.top_k for i in sampled])
        picked = _top_p(picked, [rows[i].params.top_p for i in sampled])
        probs = torch.softmax(picked, dim=-1)
        draws = torch.multinomial(probs, 1).squeeze(1)
        for j, i in enumerate(sampled):
            if rows[i].generator is not None:
                draws[j] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        tokens[sampled] = draws
        return tokens


def length_buckets(rows: list[Row], prefix_len: int, max_padding: float = MAX_PREFILL_PADDING) -> list[list[Row]]:
    """Split rows that share a prefix into prefill passes of similar length.

    Prefill is compute-bound: a row padded to the longest of its pass costs the padding's full share of
    every matrix product, and rows gain nothing from sharing a pass. Rows are taken longest first, and a
    pass is closed when adding the next row would make padding more than ``max_padding`` of its slots.
    """
    ordered = sorted(rows, key=lambda row: len(row.prompt_ids), reverse=True)
    buckets: list[list[Row]] = []
    width = used = 0
    for row in ordered:
        own = len(row.prompt_ids) - prefix_len
        slots = width * (len(buckets[-1]) + 1) if buckets else 0
        if buckets and slots - (used + own) <= max_padding * slots:
            buckets[-1].append(row)
            used += own
        else:
            buckets.append([row])
            width = used = own
    return buckets


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    if not any(k > 0 for k in ks):
        return logits
    out = logits.clone()
    for i, k in enumerate(ks):
        if 0 < k < logits.shape[-1]:
            threshold = torch.topk(logits[i], k).values[-1]
            out[i][logits[i] < threshold] = float("-inf")
    return out


def _top_p(logits: torch.Tensor, ps: list[float]) -> torch.Tensor:
    """Nucleus filter per row, by transformers' ``TopPLogitsWarper`` rule, exact ties included.

    Tokens are sorted by ascending logit; those whose cumulative probability is ``<= 1 - p`` are dropped,
    the most likely one always kept: a set whose mass is exactly ``p`` is enough, so ``p = 0.5`` over four
    equal tokens keeps two (which two of equal tokens is the sort's choice, the warper's too). The
    threshold is compared in the logits' dtype, as the warper's Python float is. A row with ``p >= 1``
    is left as it is.
    """
    if all(p >= 1.0 for p in ps):
        return logits
    ordered, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    floor = torch.tensor([1.0 - p if p < 1.0 else -1.0 for p in ps], dtype=torch.float64)
    drop = cumulative <= floor.to(device=logits.device, dtype=cumulative.dtype)[:, None]
    drop[..., -1] = False
    drop = drop.scatter(-1, order, drop)
    return logits.masked_fill(drop, float("-inf"))
