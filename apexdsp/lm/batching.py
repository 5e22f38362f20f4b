"""One worker thread owns the model; requests from any number of threads are decoded together.

DSPy parallelises by threads (``Evaluate(num_threads=...)``, ``dspy.Parallel``, ``batch``): each thread
calls the LM and blocks. Running those calls one after another would leave the CPU reading the weights
once per token per thread; handing them to one worker that decodes them as rows of one batch reads the
weights once per token for all of them. Callers get a :class:`concurrent.futures.Future` and block on it,
so the threading model of DSPy is untouched.

The worker takes everything waiting (up to ``max_batch_size``), after a short collection window when it
was idle so that requests fired together start together, and admits later arrivals between two decoding
steps (continuous batching) instead of making them wait for the whole batch to drain.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Callable

from apexdsp.lm.generation import Completion, DecodeBatch, Row, SamplingParams

logger = logging.getLogger(__name__)

_CLOSE = object()


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are grouped. ``max_batch_size=1`` turns batching off (one request at a time)."""

    max_batch_size: int = 16
    collect_window_s: float = 0.005  # after an idle spell, wait this long for companions of the first request
    join_running: bool = True  # admit new requests between steps of a running batch

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")


@dataclass
class BatchStats:
    """What the worker did: how many rows each decoding step and each prefill carried, tokens, time.

    ``step_sizes[k]`` counts the decoding steps that ran ``k`` rows at once; a batch size above one is
    the evidence that concurrent callers were served together.
    """

    requests: int = 0
    prompt_tokens: int = 0
    prefix_tokens_reused: int = 0  # prompt tokens whose states came from the shared-prefix cache
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    step_sizes: Counter = field(default_factory=Counter)
    prefill_sizes: Counter = field(default_factory=Counter)
    capped_tokens: int = 0  # completion tokens of replies cut at their max_tokens (or the context's end)
    cache_cells: int = 0  # rows x KV-cache columns the decoding steps attended over ...
    padding_cells: int = 0  # ... of which padding
    prefill_slots: int = 0  # rows x own-token columns the prefill passes computed ...
    prefill_padding: int = 0  # ... of which padding

    @property
    def busy_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def largest_batch(self) -> int:
        return max(self.step_sizes, default=0)

    @property
    def rows_per_step(self) -> float:
        steps = sum(self.step_sizes.values())
        return sum(size * count for size, count in self.step_sizes.items()) / steps if steps else 0.0

    def since(self, earlier: BatchStats) -> BatchStats:
        """The work done between ``earlier`` (a copy taken before) and these counters."""
        return BatchStats(**{f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)})

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def time_shares(self, wall_seconds: float) -> dict[str, float]:
        """Where an evaluation's time went, as shares that hold for any length of run.

        ``lm_busy_share``: of the wall time, the part the LM worker computed (the rest is retrieval, Python,
        and the worker waiting for requests); ``lm_prefill_share``: of the LM's time, the part spent reading
        prompts; ``lm_rows_per_step``: mean rows per decoding step (what batching bought);
        ``lm_prefix_reused``: prompt tokens whose states came from the shared-prefix cache;
        ``lm_capped_share``: completion tokens spent in replies that ran to their token cap (a small model
        that loops until the cap costs decoding steps for nothing); ``lm_kv_padding``: of the KV-cache
        cells the decoding steps attended over, the share that was padding (rows padded to the longest);
        ``lm_prefill_padding``: the same for the prefill passes' token slots.
        """
        if not self.requests or wall_seconds <= 0:
            return {}
        return {"lm_busy_share": min(1.0, self.busy_seconds / wall_seconds),
                "lm_capped_share": self.capped_tokens / self.completion_tokens if self.completion_tokens else 0.0,
                "lm_prefill_share": self.prefill_seconds / self.busy_seconds if self.busy_seconds else 0.0,
                "lm_rows_per_step": self.rows_per_step,
                "lm_prefix_reused": self.prefix_tokens_reused / self.prompt_tokens if self.prompt_tokens else 0.0,
                "lm_kv_padding": self.padding_cells / self.cache_cells if self.cache_cells else 0.0,
                "lm_prefill_padding": self.prefill_padding / self.prefill_slots if self.prefill_slots else 0.0}

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "completion_tokens": self.completion_tokens,
            "capped_tokens": self.capped_tokens,
            "cache_cells": self.cache_cells,
            "padding_cells": self.padding_cells,
            "prefill_slots": self.prefill_slots,
            "prefill_padding": self.prefill_padding,
            "prefill_seconds": round(self.prefill_seconds, 3),
            "decode_seconds": round(self.decode_seconds, 3),
            "decode_steps": sum(self.step_sizes.values()),
            "mean_rows_per_step": round(self.rows_per_step, 2),
            "largest_batch": self.largest_batch,
            "step_sizes": dict(sorted(self.step_sizes.items())),
            "prefill_sizes": dict(sorted(self.prefill_sizes.items())),
        }


class BatchScheduler:
    """Queue plus worker thread in front of a :class:`DecodeBatch`.

    ``make_batch`` is called once, on first use, so that constructing a scheduler costs nothing.
    """

    def __init__(self, make_batch: Callable[[], DecodeBatch], config: BatchingConfig | None = None) -> None:
        self.config = config or BatchingConfig()
        self._make_batch = make_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stats = BatchStats()
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- caller side -----------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, prefix_len: int = 0) -> Future:
        """Queue one completion; the future resolves to a :class:`Completion`.

        ``prefix_len`` says how many leading tokens other calls are likely to share (see ``DecodeBatch``).
        """
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the generation worker is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="apexdsp-lm-worker", daemon=True)
                self._thread.start()
        self._queue.put(Row(list(prompt_ids), params, ticket=future, prefix_len=prefix_len))
        return future

    def generate(self, prompt_ids: list[int], params: SamplingParams, prefix_len: int = 0) -> Completion:
        """Submit and wait: what each DSPy thread does."""
        return self.submit(prompt_ids, params, prefix_len).result()

    def stats(self) -> BatchStats:
        """A copy of the counters (safe to read while the worker runs)."""
        with self._lock:
            s = self._stats
            return BatchStats(**{f.name: copy.copy(getattr(s, f.name)) for f in fields(s)})

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = BatchStats()

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after the rows in flight; later submits raise."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(_CLOSE)
            thread.join(timeout)

    # -- worker side -----------------------------------------------------------------------------

    def _take(self, limit: int, *, block: bool) -> tuple[list[Row], bool]:
        """Up to ``limit`` waiting rows (cancelled ones dropped), and whether close was requested."""
        rows: list[Row] = []
        closing = False
        if block:
            item = self._queue.get()
            if item is _CLOSE:
                return rows, True
            rows.append(item)
            if self.config.collect_window_s > 0 and limit > 1:
                time.sleep(self.config.collect_window_s)
        while len(rows) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                closing = True
                break
            rows.append(item)
        return [row for row in rows if row.ticket.set_running_or_notify_cancel()], closing

    def _run(self) -> None:
        try:
            batch = self._make_batch()
        except BaseException as error:  # the model could not load: fail every caller, now and later
            logger.exception("the generation worker could not start")
            self._fail_forever(error)
            return
        closing = False
        while True:
            room = self.config.max_batch_size - len(batch)
            incoming: list[Row] = []
            if not len(batch):
                if closing:
                    return
                incoming, closing = self._take(room, block=True)
            elif self.config.join_running and room > 0 and not closing:
                incoming, closing = self._take(room, block=False)
            if not incoming and not len(batch):
                continue
            started, reused = time.perf_counter(), batch.prefix_tokens_reused
            cells, padding = batch.cache_cells, batch.padding_cells
            slots, slot_padding = batch.prefill_slots, batch.prefill_padding
            try:
                finished = batch.add(incoming) if incoming else []
                prefilled = time.perf_counter()
                steps_before = len(batch)
                if len(batch):
                    finished += batch.step()
            except BaseException as error:  # a bug or out-of-memory: tell the callers, keep serving
                logger.exception("generation failed for a batch of %d rows", len(batch) + len(incoming))
                for row in {id(r): r for r in [*batch.clear(), *incoming]}.values():
                    if not row.ticket.done():
                        row.ticket.set_exception(error)
                continue
            with self._lock:
                stats = self._stats
                stats.prefill_seconds += prefilled - started
                stats.decode_seconds += time.perf_counter() - prefilled
                stats.prefix_tokens_reused += batch.prefix_tokens_reused - reused
                stats.cache_cells += batch.cache_cells - cells
                stats.padding_cells += batch.padding_cells - padding
                stats.prefill_slots += batch.prefill_slots - slots
                stats.prefill_padding += batch.prefill_padding - slot_padding
                if incoming:
                    stats.prefill_sizes[len(incoming)] += 1
                if steps_before:
                    stats.step_sizes[steps_before] += 1
                for row in finished:
                    stats.requests += 1
                    stats.prompt_tokens += len(row.prompt_ids)
                    stats.completion_tokens += len(row.generated)
                    if row.finish_reason == "length":
                        stats.capped_tokens += len(row.generated)
            for row in finished:
                row.ticket.set_result(row.completion())

    def _fail_forever(self, error: BaseException) -> None:
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                return
            if item.ticket.set_running_or_notify_cancel():
                item.ticket.set_exception(error)

