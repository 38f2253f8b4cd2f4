"""Batched decoding (engine/batching.py) and the preallocated KV cache, on tiny random models:
a request decoded in a batch (joining late, leaving early, beside rows of other lengths and other memory
prefixes) gives the tokens it gives alone, and the preallocated cache gives the logits of the per-token
`torch.cat` cache it replaced."""

from __future__ import annotations

import threading

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine.batching import BatchDecoder, BatchScheduler, Sequence, _END
from msa_plugins.engine.generation import GenerationStats, Sampler, generate_tokens, stop_token_ids
from msa_plugins.engine.model import KVCache

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog.", "Berlin is the capital of Germany."]
PROMPTS = ["Where was Alice born?", "What is the capital of France? Tell me more about it please.",
           "fox", "0123456789 abcdefghij", "Berlin is the capital of", "Memory sparse attention routes"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return MSAEngine.from_pretrained(tiny_model_dir("qwen3"), device="cpu", chunk_size=4)


def _ids(engine, text):
    return engine.model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _memory(engine, seed, sizes):
    """A made-up sparse-memory prefix: per routing layer random pooled K/V of `sizes[i]` chunks."""
    g = torch.Generator().manual_seed(seed)
    m = engine.model
    memory = [None] * m.n_layers
    for layer, M in zip(engine.routing_layers, sizes):
        memory[layer] = (torch.randn(1, m.n_kv_heads, M, m.head_dim, generator=g),
                         torch.randn(1, m.n_kv_heads, M, m.head_dim, generator=g))
    return memory


def _alone(engine, ids, n, memory=None, offset=0, temperature=0.0, seed=None):
    return list(generate_tokens(engine.model, ids, n, temperature, memory=memory, position_offset=offset, seed=seed,
                                stop_ids=set()))


@pytest.mark.parametrize("with_memory", [False, True], ids=["dense", "sparse"])
def test_preallocated_cache_gives_the_logits_of_the_cat_cache(engine, with_memory):
    model = engine.model
    memory = _memory(engine, 0, [3, 5]) if with_memory else []
    ids = _ids(engine, PROMPTS[1])
    out = {}
    for pre in (True, False):
        cache = KVCache(model.n_layers, memory=list(memory), preallocated=pre)  # capacity 0: grows by doubling
        steps = [model.forward(torch.tensor([ids]), torch.arange(len(ids))[None] + 2, cache=cache, logits="all")[0]]
        tok, pos = int(steps[0][-1].argmax()), len(ids) + 2
        for _ in range(40):  # past the first allocation: the preallocated one must grow
            logits = model.forward(torch.tensor([[tok]]), torch.tensor([[pos]]), cache=cache)
            steps.append(logits)
            tok, pos = int(logits[0].argmax()), pos + 1
        out[pre] = steps
        assert cache.length() == len(ids) + 40
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _run_batch(decoder, requests, join_at):
    """Drive a BatchDecoder: request i joins before step join_at[i]; returns each request's tokens."""
    got = [[] for _ in requests]
    ended = [False] * len(requests)

    def sink(i):
        def emit(item):
            if item is _END:
                ended[i] = True
            else:
                got[i].append(item)
        return emit

    step = 0
    while not all(ended):
        for i, (ids, n, memory, offset) in enumerate(requests):
            if join_at[i] == step:
                decoder.admit(Sequence(ids, n, Sampler(), set(), sink(i), memory=memory, position_offset=offset))
        decoder.step()
        step += 1
        assert step < 500
    return got


def test_a_request_in_a_batch_decodes_as_it_does_alone(engine):
    """Rows of different prompt lengths join at different steps, leave at different steps (slots are
    compacted), and each gets the greedy tokens it gets alone."""
    requests = [(_ids(engine, p), n, None, 0) for p, n in zip(PROMPTS, [12, 30, 5, 20, 1, 25])]
    decoder = BatchDecoder(engine.model, max_batch=6)
    got = _run_batch(decoder, requests, join_at=[0, 0, 2, 3, 3, 9])
    for (ids, n, _, _), tokens in zip(requests, got):
        assert tokens == _alone(engine, ids, n)
    assert len(decoder) == 0 and decoder.cache.n_tokens == [0] * 6


def test_sparse_requests_with_their_own_memory_prefix_batch_together(engine):
    """Sparse mode: each request carries its own per-layer memory prefix (different sizes per layer and
    per request) and position offset, in the same batch as a prompt-only request."""
    requests = [(_ids(engine, PROMPTS[0]), 15, _memory(engine, 1, [2, 6]), 2),
                (_ids(engine, PROMPTS[1]), 20, None, 0),
                (_ids(engine, PROMPTS[3]), 18, _memory(engine, 2, [7, 1]), 3)]
    got = _run_batch(BatchDecoder(engine.model, max_batch=3), requests, join_at=[0, 1, 4])
    for (ids, n, memory, offset), tokens in zip(requests, got):
        assert tokens == _alone(engine, ids, n, memory=memory, offset=offset)


def test_a_full_batch_refuses_and_a_stop_token_ends_a_request(engine):
    decoder = BatchDecoder(engine.model, max_batch=1)
    ids = _ids(engine, PROMPTS[0])
    first = _alone(engine, ids, 3)
    events = []
    decoder.admit(Sequence(ids, 10, Sampler(), {first[2]}, events.append))
    with pytest.raises(ValueError, match="batch is full"):
        decoder.admit(Sequence(ids, 10, Sampler(), set(), events.append))
    while len(decoder):
        decoder.step()
    assert events == first[:2] + [_END]


def test_the_scheduler_batches_concurrent_engine_calls(tiny_model_dir):
    """Through the facade, from threads: answers (interleave and sparse), plain generation and a seeded
    sampled generation equal the same calls made alone; a stream closed early frees its slot."""
    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, max_new_tokens=16)
    engine.add(DOCS, progress=False)
    calls = [lambda: engine.query(PROMPTS[0]).answer,
             lambda: engine.query(PROMPTS[1], mode="sparse", k=2).answer,
             lambda: engine.generate(PROMPTS[2], max_new_tokens=24).text,
             lambda: engine.generate(PROMPTS[3], temperature=0.9, seed=7).text,
             lambda: engine.query(PROMPTS[4], mode="sparse", k=3, max_new_tokens=9).answer]
    alone = [call() for call in calls]
    with BatchScheduler(engine.model, max_batch=4) as scheduler:
        results = [None] * len(calls)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, calls[i]())) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == alone
        assert scheduler.steps > 0 and scheduler.batch_rows > scheduler.steps  # more than one row per step

        stream = engine.stream_generate(PROMPTS[1], max_new_tokens=200)
        next(iter(stream))
        stream.close()
        assert engine.generate(PROMPTS[2], max_new_tokens=24).text == alone[2]  # the closed one left its slot
        assert scheduler.live == 0 and scheduler.waiting == 0
    assert engine.generate(PROMPTS[2], max_new_tokens=24).text == alone[2]  # detached: alone again


def test_usage_and_finish_reason_are_the_same_in_a_batch(tiny_model_dir):
    engine = MSAEngine.from_pretrained(tiny_model_dir("qwen2"), device="cpu")
    alone = engine.generate(PROMPTS[1], max_new_tokens=10)
    with BatchScheduler(engine.model, max_batch=2):
        batched = engine.generate(PROMPTS[1], max_new_tokens=10)
    assert (batched.text, batched.prompt_tokens, batched.completion_tokens, batched.finish_reason) == \
        (alone.text, alone.prompt_tokens, alone.completion_tokens, alone.finish_reason)
    assert batched.timings["first_token_s"] > 0


def test_stats_of_a_batched_request(engine):
    stats = GenerationStats()
    with BatchScheduler(engine.model, max_batch=2):
        tokens = list(generate_tokens(engine.model, _ids(engine, PROMPTS[0]), 7, stats=stats,
                                      stop_ids=stop_token_ids(engine.model)))
    assert stats.completion_tokens == len(tokens) == len(stats.token_ids)
    assert stats.prompt_tokens == len(_ids(engine, PROMPTS[0]))
