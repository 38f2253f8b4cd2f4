"""Continuous batching: concurrent requests decode together, one forward per step for all of them.

A request is prefilled alone (its prompt, after its own sparse-memory prefix when it has one) into a
cache sized for it, picks its first token, then joins a slot of one shared `KVCache`; each step runs
the model once over every live slot ([n, 1] tokens), so the weights are read once per step instead of
once per request. A request leaves the batch when it ends (stop token, max_new_tokens, cancelled) and
the last live slot moves into its place, so live slots stay packed at 0..n-1 and a step's keys are a
view of the buffers.

Rows differ in length and in memory prefix (sparse mode: each routing layer holds that request's own
selected chunks), so a step masks each row's keys to its own length (`KVCache.update`). Greedy tokens
equal those of the request decoded alone up to floating-point summation order (a masked softmax over
padded keys and a [n, hidden] matrix product instead of [1, hidden]); tests/test_batching.py checks it.

`BatchDecoder` is the synchronous core (tests and benchmarks drive it step by step); `BatchScheduler`
runs it on a thread and serves `generate_tokens` calls from any thread while attached to a model.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from ..errors import InvalidArgumentError
from .generation import GenerationStats, Sampler, attach_scheduler, detach_scheduler
from .model import DecoderModel, KVCache

logger = logging.getLogger(__name__)

_END = object()  # a sequence's last event


@dataclass
class Sequence:
    """One request in the batch: its prompt, budget and sampler, and where its tokens go (`emit` gets
    token ids, then `_END` or an exception)."""
    prompt_ids: list
    max_new_tokens: int
    sampler: Sampler
    stop_ids: set
    emit: Callable[[object], None]
    memory: Optional[list] = None  # per layer None or (k [1,G,M,D], v [1,G,M,D]): sparse mode's prefix
    position_offset: int = 0
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set from any thread; the scheduler drops the sequence at its next step
    # decoding state, owned by the decoder
    next_pos: int = 0
    generated: int = 0
    last_token: int = -1

    def cancel(self) -> None:
        self.cancelled = True


class BatchDecoder:
    """Decodes up to `max_batch` sequences together over one preallocated cache. Not thread-safe: one
    thread calls `admit` and `step` (the `BatchScheduler`'s)."""

    def __init__(self, model: DecoderModel, max_batch: int = 8):
        if max_batch < 1:
            raise InvalidArgumentError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.cache = KVCache(model.n_layers, batch=max_batch)
        self.live: list = []  # Sequence in slot order: live[i] decodes in cache slot i

    def __len__(self) -> int:
        return len(self.live)

    @property
    def full(self) -> bool:
        return len(self.live) >= self.max_batch

    @torch.inference_mode()
    def admit(self, seq: Sequence) -> None:
        """Prefill `seq` alone, emit its first token, and give it a slot unless it already ended."""
        if self.full:
            raise InvalidArgumentError("the batch is full; admit after a sequence leaves")
        t0 = time.perf_counter()
        model = self.model
        n_memory = max((m[0].shape[2] for m in seq.memory or [] if m is not None), default=0)
        single = KVCache(model.n_layers, memory=list(seq.memory) if seq.memory else [],
                         capacity=n_memory + len(seq.prompt_ids))
        ids = torch.tensor([seq.prompt_ids], dtype=torch.long)
        pos = seq.position_offset + torch.arange(len(seq.prompt_ids))[None]
        logits = model.forward(ids, pos, cache=single)  # [1, vocab]
        seq.stats.prompt_tokens = len(seq.prompt_ids)
        seq.stats.prefill_s = time.perf_counter() - t0
        seq.stats.first_token_s = time.perf_counter() - seq.submitted  # queueing included: what a client waits
        seq.next_pos = seq.position_offset + len(seq.prompt_ids)
        if self._take(seq, seq.sampler.pick(logits[0])):
            return
        slot = len(self.live)
        # the slot keeps room for every token this sequence may still add
        self.cache.put(slot, single, reserve=n_memory + len(seq.prompt_ids) + seq.max_new_tokens)
        self.live.append(seq)

    def _take(self, seq: Sequence, tok: int) -> bool:
        """Hand `tok` to the sequence; True when the sequence has ended."""
        if tok in seq.stop_ids:
            seq.stats.finish_reason = "stop"
            seq.emit(_END)
            return True
        seq.generated += 1
        seq.last_token = tok
        seq.emit(tok)
        if seq.generated >= seq.max_new_tokens:
            seq.stats.finish_reason = "length"
            seq.emit(_END)
            return True
        return False

    @torch.inference_mode()
    def step(self) -> int:
        """Drop cancelled sequences, then decode one token for every live one. Returns the live count."""
        for i in reversed(range(len(self.live))):
            if self.live[i].cancelled:
                self.live[i].emit(_END)
                self._leave(i)
        if not self.live:
            return 0
        ids = torch.tensor([[s.last_token] for s in self.live], dtype=torch.long)  # [n, 1]
        pos = torch.tensor([[s.next_pos] for s in self.live], dtype=torch.long)  # each row its own position
        logits = self.model.forward(ids, pos, cache=self.cache)  # [n, vocab]
        greedy = torch.argmax(logits, dim=-1).tolist()  # one op for every greedy row
        ended = []
        for i, seq in enumerate(self.live):
            seq.next_pos += 1
            tok = greedy[i] if seq.sampler.temperature == 0 else seq.sampler.pick(logits[i])
            if self._take(seq, tok):
                ended.append(i)
        for i in reversed(ended):
            self._leave(i)
        return len(self.live)

    def _leave(self, i: int) -> None:
        last = len(self.live) - 1
        if i != last:  # keep the live slots packed: the last one moves into the hole
            self.cache.move(last, i)
            self.live[i] = self.live[last]
        self.cache.clear(last)
        self.live.pop()

    def fail_all(self, error: BaseException) -> None:
        """End every live sequence with `error` (after a failed step: their caches are not trustworthy)."""
        for seq in self.live:
            seq.emit(error)
        for slot in range(len(self.live)):
            self.cache.clear(slot)
        self.live.clear()


class BatchScheduler:
    """Runs a `BatchDecoder` on its own thread; while started it is attached to the model, so every
    `generate_tokens` call on that model (answers, plain generation, from any thread) joins the batch.

    Each loop: admit waiting sequences while slots are free (at most `prefill_tokens` prompt tokens per
    loop, so a burst of long prompts does not stall the live ones for long), then one decode step.
    """

    def __init__(self, model: DecoderModel, max_batch: int = 8, prefill_tokens: int = 2048):
        self.decoder = BatchDecoder(model, max_batch)
        self.model = model
        self.prefill_tokens = prefill_tokens
        self._waiting: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.steps = 0  # decode steps run
        self.batch_rows = 0  # sum of live rows over steps: batch_rows / steps = mean batch size

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "BatchScheduler":
        if self._thread is None:
            self._stopping = False
            attach_scheduler(self.model, self)
            self._thread = threading.Thread(target=self._run, name="msa-batch-decoder", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Detach from the model and end the thread; sequences still waiting or decoding end now."""
        if self._thread is None:
            return
        detach_scheduler(self.model, self)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "BatchScheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def waiting(self) -> int:
        """Sequences submitted and not yet prefilled (the queue depth)."""
        return len(self._waiting)

    @property
    def live(self) -> int:
        """Sequences decoding in the batch now."""
        return len(self.decoder)

    # ------------------------------------------------------------------ requests
    def tokens(self, prompt_ids: list, max_new_tokens: int, sampler: Sampler, memory: Optional[list] = None,
               position_offset: int = 0, stats: Optional[GenerationStats] = None,
               stop_ids: Optional[set] = None) -> Iterator[int]:
        """The `generate_tokens` of a batched request: submitted on the first `next()`, its tokens as the
        batch produces them; closing the iterator early frees its slot at the next step."""
        stats = stats if stats is not None else GenerationStats()
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        seq = Sequence(list(prompt_ids), max_new_tokens, sampler, stop_ids or set(), inbox.put, memory=memory,
                       position_offset=position_offset, stats=stats)
        self.submit(seq)
        t_first = None
        try:
            while True:
                item = inbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if t_first is None:
                    t_first = time.perf_counter()
                stats.completion_tokens += 1
                stats.token_ids.append(item)
                yield item
        finally:
            seq.cancel()  # no-op when it ended by itself
            if t_first is not None:
                stats.decode_s = time.perf_counter() - t_first

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if self._thread is None or self._stopping:
                raise InvalidArgumentError("the batch scheduler is not running; start() it first")
            seq.submitted = time.perf_counter()
            self._waiting.append(seq)
            self._wake.notify()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        decoder = self.decoder
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not len(decoder):
                    self._wake.wait()
                if self._stopping:
                    break
                admit = []
                budget = self.prefill_tokens
                while self._waiting and len(decoder) + len(admit) < decoder.max_batch:
                    if admit and len(self._waiting[0].prompt_ids) > budget:
                        break
                    seq = self._waiting.popleft()
                    budget -= len(seq.prompt_ids)
                    admit.append(seq)
            for seq in admit:
                if seq.cancelled:
                    seq.emit(_END)
                    continue
                try:
                    decoder.admit(seq)
                except Exception as e:  # this request's prefill failed (e.g. out of memory): it alone ends
                    logger.exception("prefill failed")
                    seq.emit(e)
            try:
                rows = len(decoder)
                if rows:
                    decoder.step()
                    self.steps += 1
                    self.batch_rows += rows
            except Exception as e:  # a failed step leaves the shared cache unknown: end the live sequences
                logger.exception("batched decode step failed")
                decoder.fail_all(e)
        # stopping: nothing more is decoded; every waiting or live sequence ends
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting + list(decoder.live):
            seq.emit(_END)
        for slot in range(len(decoder)):
            decoder.cache.clear(slot)
        decoder.live.clear()
