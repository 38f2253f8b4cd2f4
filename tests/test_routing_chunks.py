"""Routing keys pooled over fewer tokens than the content chunks (`MSAConfig.routing_chunk_size`).

The reference for each half is an engine with one chunk size for both: a memory with P=8, P_R=2 must
hold exactly the routing keys (and route exactly) like a P=2 memory, and exactly the content K̄/V̄ of a
P=8 memory, through add, delete, upsert, save and load.
"""

import logging

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine import storage
from msa_plugins.engine.generation import sparse_memory
from msa_plugins.errors import MemoryFormatError, ModelMismatchError

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter in a small studio.",
        "Fox.", "Berlin is the capital of Germany and its largest city by population."]
IDS = ["paris", "alice", "fox", "berlin"]
QUESTIONS = ["Where was Alice born?", "What is the capital of Germany?", "fox"]


def engines(tiny_model_dir, **kw):
    path = tiny_model_dir("llama")
    mixed = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8, routing_chunk_size=2, **kw)
    fine = MSAEngine.from_pretrained(path, device="cpu", chunk_size=2, **kw)  # routing reference
    coarse = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8, **kw)  # content reference
    return mixed, fine, coarse


def assert_halves_match(mixed, fine, coarse):
    m, f, c = mixed._bank.state, fine._bank.state, coarse._bank.state  # below the facade: stored tensors
    assert m.ids == f.ids == c.ids
    assert torch.equal(m.keys_r, f.keys_r) and torch.equal(m.chunk_doc, f.chunk_doc)
    assert torch.equal(m.doc_start, f.doc_start)
    assert torch.equal(m.keys, c.keys) and torch.equal(m.values, c.values)
    assert [m.content_range(r) for r in range(len(m))] == [c.chunk_range(r) for r in range(len(c))]
    if m.inputs is not None:
        assert torch.equal(m.inputs, f.inputs)
    for q in QUESTIONS:
        a, b = mixed.route(q, k=len(m)), fine.route(q, k=len(f))
        assert a.ids == b.ids and a.scores == b.scores
    # sparse generation reads the content chunks of the selected documents: those of the P=8 memory
    rows = torch.arange(len(m)).view(1, -1).expand(len(mixed.routing_layers), -1)
    for (km, vm), (kc, vc) in zip(
            [x for x in sparse_memory(m, rows, mixed.model.n_layers, mixed.routing_layers, mixed.model) if x],
            [x for x in sparse_memory(c, rows, coarse.model.n_layers, coarse.routing_layers, coarse.model) if x]):
        assert torch.equal(km, kc) and torch.equal(vm, vc)


def test_finer_routing_keys_route_like_that_chunk_size_and_keep_the_content_chunks(tiny_model_dir, tmp_path):
    mixed, fine, coarse = engines(tiny_model_dir, keep_inputs=True)
    for e in (mixed, fine, coarse):
        e.add(DOCS, ids=IDS)
    s = mixed._bank.state
    assert s.n_chunks > s.keys.shape[1]  # the routing keys really are finer
    assert_halves_match(mixed, fine, coarse)
    for e in (mixed, fine, coarse):  # rows removed and re-added: the two offset tables stay in step
        e.delete(["alice"])
        e.upsert(["Alice now lives in Porto, where she paints harbours and boats."], ids=["alice"])
        e.add(["Short."], ids=["short"])
    assert_halves_match(mixed, fine, coarse)
    mixed.save(tmp_path)
    back = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=8, routing_chunk_size=2,
                                     keep_inputs=True, memory=str(tmp_path))
    assert_halves_match(back, fine, coarse)
    assert mixed.query(QUESTIONS[0], mode="sparse", max_new_tokens=4).answer == \
        back.query(QUESTIONS[0], mode="sparse", max_new_tokens=4).answer


def test_one_chunk_size_keeps_the_papers_layout(tiny_model_dir):
    same = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, routing_chunk_size=4)
    same.add(DOCS, ids=IDS)
    assert same._bank.state.content_start is None  # no second offset table, nothing new in the saved files
    assert "routing_chunk_size" not in same.fingerprint()  # memories saved before the setting keep loading


def test_a_loaded_memory_brings_its_routing_chunk_size_and_other_settings_must_match(tiny_model_dir, tmp_path, caplog):
    path = tiny_model_dir("llama")
    mixed, fine, coarse = engines(tiny_model_dir)
    for e in (mixed, fine, coarse):
        e.add(DOCS, ids=IDS)
    mixed.save(tmp_path / "mixed")
    coarse.save(tmp_path / "plain")
    # a memory with one P for both (as saved before routing_chunk_size existed) loads into any engine
    with caplog.at_level(logging.WARNING, logger="msa_plugins.core"):
        back = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8, routing_chunk_size=2,
                                         memory=str(tmp_path / "plain"))
    assert "using the memory's" in caplog.text  # the P_R it was given is not dropped silently
    assert back.config.key_chunk_size == 8 and back._bank.state.content_start is None
    assert back.route(QUESTIONS[0], k=4).ids == coarse.route(QUESTIONS[0], k=4).ids
    # and the other way: an engine pooling routing keys over 8 tokens loads the 2-token memory and keys later
    # adds like it
    plain = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8, memory=str(tmp_path / "mixed"))
    assert plain.config.key_chunk_size == 2 and plain.fingerprint() == mixed.fingerprint()
    for e in (plain, fine, coarse):
        e.add(["Lisbon is the capital of Portugal."], ids=["lisbon"])
    assert_halves_match(plain, fine, coarse)
    # another content chunk size is refused, and the refused load changes nothing
    other = MSAEngine.from_pretrained(path, device="cpu", chunk_size=4, routing_chunk_size=4)
    other.add(DOCS[:1], ids=["paris"])
    with pytest.raises(ModelMismatchError, match="chunk_size") as err:
        other.load(str(tmp_path / "mixed"))
    assert other.config.key_chunk_size == 4 and len(other) == 1 and "routing_chunk_size" not in other.fingerprint()
    # an engine whose one P equals the memory's P_R: only the content chunk size differs, and only it is named
    same_r = MSAEngine.from_pretrained(path, device="cpu", chunk_size=2)
    with pytest.raises(ModelMismatchError) as err:
        same_r.load(str(tmp_path / "mixed"))
    assert "chunk_size: saved 8 vs engine 2" in str(err.value) and "routing_chunk_size" not in str(err.value)


def test_damaged_content_offsets_are_refused(tiny_model_dir):
    mixed = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=8, routing_chunk_size=2)
    mixed.add(DOCS, ids=IDS)
    s = mixed._bank.state
    t = {"doc_start": s.doc_start, "chunk_doc": s.chunk_doc, "keys_r": s.keys_r, "keys": s.keys,
         "values": s.values, "content_start": s.content_start}
    n, c, L = len(s), s.n_chunks, len(mixed.routing_layers)
    storage._check_tensors("t", t, n, c, L)  # the intact tensors pass
    for bad in (s.content_start[:-1], s.content_start.flip(0), s.content_start + 1,
                torch.cat([s.content_start[:-1], s.content_start[-1:] + 1])):
        with pytest.raises(MemoryFormatError):
            storage._check_tensors("t", {**t, "content_start": bad}, n, c, L)
    # offsets that stay well formed but give one document another's chunk count: only the token counts show it
    n_tokens = list(s.n_tokens)
    storage._check_tensors("t", t, n, c, L, n_tokens=n_tokens, chunk_sizes=(2, 8))
    counts = (s.content_start[1:] - s.content_start[:-1]).tolist()
    assert counts[1] != counts[2]
    counts[1], counts[2] = counts[2], counts[1]
    swapped = torch.cat([torch.zeros(1, dtype=torch.long), torch.tensor(counts).cumsum(0)])
    storage._check_tensors("t", {**t, "content_start": swapped}, n, c, L)  # the shapes alone cannot tell
    with pytest.raises(MemoryFormatError, match="content_start"):
        storage._check_tensors("t", {**t, "content_start": swapped}, n, c, L, n_tokens=n_tokens, chunk_sizes=(2, 8))
    with pytest.raises(MemoryFormatError, match="doc_start"):  # routing keys pooled over another size
        storage._check_tensors("t", t, n, c, L, n_tokens=n_tokens, chunk_sizes=(4, 8))


def test_bad_routing_chunk_size_is_refused(tiny_model_dir):
    from msa_plugins.errors import InvalidArgumentError, InvalidTypeError

    with pytest.raises((InvalidArgumentError, InvalidTypeError), match="routing_chunk_size"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", routing_chunk_size=0)


def test_router_features_are_keyed_by_the_routing_chunk_size_and_old_caches_stay_valid(tiny_model_dir):
    from msa_plugins.trainer import _fingerprint

    path = tiny_model_dir("llama")
    plain = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8)
    fp = plain.fingerprint()
    # the order and values of caches built before routing_chunk_size existed: their data hash must not move
    assert list(_fingerprint(plain).items()) == [(k, fp[k]) for k in (
        "model", "config_hash", "weights_hash", "tokenizer_hash", "chunk_size", "routing_layers")]
    mixed = MSAEngine.from_pretrained(path, device="cpu", chunk_size=8, routing_chunk_size=2)
    fine = MSAEngine.from_pretrained(path, device="cpu", chunk_size=2)
    assert _fingerprint(mixed) == _fingerprint(fine)  # features are routing chunks: P_R is what they depend on
