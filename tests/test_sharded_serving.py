"""Memory-parallel routing for serving: the test process is rank 0 of a 2-process gloo
group (`ShardGroup.spawn`), holding the engine; the spawned worker routes its shard of the memory. Every
selection (layer-mean ids and scores, per-layer rows) and every answer must equal one process's, with
filters and collections, after writes (the shards are re-shipped), and through `msa serve --nproc 2`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine.sharding import ShardGroup, shard_bounds

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog.", "Berlin is the capital of Germany.",
        "Memory sparse attention routes each question to a few documents.",
        "What is the capital of France? It is Paris, on the Seine.", "0123456789 and the alphabet abcdefg.",
        "Alice paints foxes in Lisbon; Berlin buys them.", "The lazy dog sleeps in Paris all day long, every day.",
        "Germany and France share a border.", "Documents are routed by chunk-pooled keys.",
        "A painter was born in 1990."]
IDS = [f"d{i}" for i in range(len(DOCS))]
META = [{"topic": "geo" if i % 3 else "other"} for i in range(len(DOCS))]
QUESTIONS = ["Where was Alice born?", "What is the capital of France?", "What does the fox do?",
             "Where is Berlin?", "How are documents routed?"]


@pytest.fixture(scope="module")
def shards():
    group = ShardGroup.spawn(2, timeout_s=120, heartbeat_s=5)
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, shards):
    eng = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, max_new_tokens=6)
    eng.add(DOCS[:8], ids=IDS[:8], metadata=META[:8], progress=False)
    eng.add(DOCS[8:], ids=IDS[8:], metadata=META[8:], progress=False, collection="notes")
    eng.router_for_test = shards.router()
    return eng


def both(engine, fn):
    """fn(engine) routed in this process, then memory-parallel."""
    engine.use_sharded_routing(None)
    alone = fn(engine)
    engine.use_sharded_routing(engine.router_for_test)
    try:
        return alone, fn(engine)
    finally:
        engine.use_sharded_routing(None)


def assert_same_routing(a, b):
    """Identical selections; scores equal to fp32 rounding (the BLAS may sum a matmul over a shard's
    width in another order than over the whole bank's: a few ULP, see engine/sharding.py)."""
    assert a.ids == b.ids and a.rows == b.rows
    assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-6, atol=0)
    assert a.per_layer.keys() == b.per_layer.keys()
    for layer, (ids, scores) in a.per_layer.items():
        assert b.per_layer[layer][0] == ids
        assert torch.allclose(torch.tensor(b.per_layer[layer][1]), torch.tensor(scores), rtol=1e-6, atol=0)
    assert torch.equal(a.per_layer_rows, b.per_layer_rows)


def same_scores(a, b) -> bool:
    return torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=1e-6, atol=0)


def test_shard_bounds_cut_whole_documents_balanced_by_chunks():
    doc_start = torch.tensor([0, 4, 5, 6, 10, 12, 12, 13])  # 7 documents, one of them chunkless
    for world in (1, 2, 3, 7, 9):
        bounds = shard_bounds(doc_start, 13, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == 7 and bounds[-1][3] == 13
        for (r0, r1, c0, c1), nxt in zip(bounds, bounds[1:] + [None]):
            assert r0 <= r1 and (c0, c1) == (int(doc_start[r0]), int(doc_start[r1]))
            if nxt is not None:
                assert nxt[0] == r1
    assert shard_bounds(doc_start, 13, 2) == [(0, 3, 0, 6), (3, 7, 6, 13)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [1, 3, 50])
def test_sharded_routing_equals_one_process(engine, k):
    for q in QUESTIONS:
        alone, sharded = both(engine, lambda e: e.route(q, k=k, collection="*"))
        assert_same_routing(alone, sharded)
    # the worker's block really was selected from (the exchange crossed processes)
    state = engine.snapshot()._state
    (_, split, _, _), _ = shard_bounds(state.doc_start, state.n_chunks, 2)
    rows = {r for q in QUESTIONS for r in both(engine, lambda e: e.route(q, k=3, collection="*"))[1].rows}
    assert any(r < split for r in rows) and any(r >= split for r in rows)


@pytest.mark.timeout(120)
def test_filters_and_collections_apply_before_top_k_on_every_shard(engine):
    cases = [dict(where=["d1", "d7", "d9", "d11"], collection="*"), dict(collection="notes"), dict(),
             dict(where=lambda d: d.metadata["topic"] == "other", collection="*"), dict(where=["d10"], collection="*")]
    for kw in cases:
        for q in QUESTIONS[:3]:
            alone, sharded = both(engine, lambda e: e.route(q, k=3, **kw))
            assert_same_routing(alone, sharded)
            allowed = set(engine.snapshot().select(kw.get("where"), collection=kw.get("collection", "default"))) \
                if kw.get("collection") != "*" else set(engine.snapshot().select(kw.get("where")))
            assert set(sharded.ids) <= allowed
            a, b = both(engine, lambda e: e.retrieve(q, k=4, rounds=2, **kw))
            assert [(d.id, d.round) for d in a] == [(d.id, d.round) for d in b]
            assert same_scores([d.score for d in a], [d.score for d in b])


@pytest.mark.timeout(180)
def test_answers_equal_one_process_in_interleave_and_sparse(engine):
    for mode in ("interleave", "sparse"):
        for q in QUESTIONS[:2]:
            a, b = both(engine, lambda e: e.query(q, mode=mode, collection="*", temperature=0.0))
            assert a.answer == b.answer and [d.id for d in a.documents] == [d.id for d in b.documents]
            assert {layer: ids for layer, (ids, _) in a.per_layer.items()} == \
                {layer: ids for layer, (ids, _) in b.per_layer.items()}


@pytest.mark.timeout(180)
def test_writes_reship_the_shards(engine):
    router = engine.router_for_test
    engine.use_sharded_routing(router)
    try:
        engine.route(QUESTIONS[0], collection="*")
        first = router._state
        assert first is engine.snapshot()._state
        engine.add(["Lisbon is the capital of Portugal, where Alice was born."], ids=["new"], progress=False)
        engine.delete(["d1", "d9"], collection="*")
    finally:
        engine.use_sharded_routing(None)
    for q in QUESTIONS:
        alone, sharded = both(engine, lambda e: e.route(q, k=4, collection="*"))
        assert_same_routing(alone, sharded)
        assert "d1" not in sharded.ids and "d9" not in sharded.ids
    assert router._state is engine.snapshot()._state and router._state is not first
    # a snapshot taken before the writes still routes against its own version
    alone, sharded = both(engine, lambda e: e.route(QUESTIONS[0], k=50, collection="*", snapshot=engine.snapshot()))
    assert "new" in sharded.ids and len(sharded.ids) == len(engine)


@pytest.mark.timeout(180)
def test_a_second_memory_with_int8_keys_gets_its_own_slot(tiny_model_dir, engine, shards):
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=2,
                                      int8_routing_keys=True)
    other.add(DOCS[::-1], ids=IDS, progress=False)
    other.router_for_test = shards.router()
    for q in QUESTIONS:
        assert_same_routing(*both(other, lambda e: e.route(q, k=5)))
        assert_same_routing(*both(engine, lambda e: e.route(q, k=5, collection="*")))  # its shard is still held
    other.router_for_test.close()


# ------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_msa_serve_nproc_2_answers_as_one_process(tiny_model_dir, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    model = tiny_model_dir("llama")
    ref = MSAEngine.from_pretrained(model, device="cpu", k=3, max_new_tokens=6)  # the server's settings
    ref.add(DOCS, ids=IDS, metadata=META, progress=False)
    ref.save(str(tmp_path / "docs"))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "msa_plugins.server", "--model", model, "--device", "cpu",
                             "--memory", f"docs={tmp_path / 'docs'}", "--port", str(port), "--nproc", "2",
                             "-k", "3", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            t_end = time.monotonic() + 150
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < t_end, "the server did not start"
                time.sleep(0.5)
            for q in QUESTIONS[:3]:
                got = http.post("/v1/memories/docs/search", json={"query": q, "k": 3}).json()
                want = ref.retrieve(q, k=3)
                docs = got["data"]
                assert [d["id"] for d in docs] == [d.id for d in want]
                assert same_scores([d["score"] for d in docs], [d.score for d in want])
            # an answer through the batch scheduler, routed over both processes
            msg = [{"role": "user", "content": QUESTIONS[1]}]
            chat = http.post("/v1/chat/completions", json={"model": "docs", "messages": msg, "max_tokens": 6,
                                                           "temperature": 0}).json()
            want = ref.query(QUESTIONS[1], max_new_tokens=6, temperature=0.0)
            assert [d["id"] for d in chat["sources"]] == [d.id for d in want.documents]
            assert chat["choices"][0]["message"]["content"] == want.answer
            added = http.post("/v1/memories/docs/documents",
                              json={"documents": [{"id": "new", "text": "Lisbon is in Portugal, Alice's city."}]})
            assert added.status_code < 300, added.text
            ref.add(["Lisbon is in Portugal, Alice's city."], ids=["new"], progress=False)
            got = http.post("/v1/memories/docs/search", json={"query": QUESTIONS[0], "k": 13}).json()
            docs = got["data"]
            assert [d["id"] for d in docs] == [d.id for d in ref.retrieve(QUESTIONS[0], k=13)]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
