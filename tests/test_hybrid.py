"""Hybrid routing: the memory's BM25 index, rank fusion, multi-round retrieval, late scoring.

The index is checked against a from-scratch rebuild after every kind of write, against a plain BM25
written here from its formula (and against `bm25s` when installed), and through save/load, including
tampered files. Fusion is checked against plain reference implementations.
"""

import json
import math
import os
from collections import Counter

import pytest
import torch

from msa_plugins import ALL_COLLECTIONS, InvalidArgumentError, MemoryFormatError, ModelMismatchError, MSAEngine
from msa_plugins.engine import lexical, storage
from msa_plugins.engine.lexical import LexicalIndex
from msa_plugins.engine.routing import RRF_K, fuse

DOCS = {
    "lisbon": "Alice was born in Lisbon, the capital of Portugal.",
    "paris": "Paris is the capital of France and its largest city.",
    "pin": "Ana's bank PIN is 4321; she never shares it.",
    "tower": "The Eiffel Tower stands in Paris; it was finished in 1889.",
    "garden": "Tomatoes grow best in warm gardens with plenty of sun.",
    "lighthouse": "The old lighthouse keeper rowed to the island every winter.",
}


@pytest.fixture()
def engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, max_new_tokens=2)
    e.add(list(DOCS.values()), ids=list(DOCS), progress=False)
    return e


def bm25_reference(texts, question, k1=1.5, b=0.75):
    """Lucene (8+) BM25 from its formula, over the same tokens."""
    docs = [Counter(lexical.tokenize(t)) for t in texts]
    n = len(docs)
    avgdl = sum(sum(d.values()) for d in docs) / n
    out = []
    for d in docs:
        dl, s = sum(d.values()), 0.0
        for term in dict.fromkeys(lexical.tokenize(question)):
            df = sum(term in x for x in docs)
            if df and term in d:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                s += idf * d[term] / (d[term] + k1 * (1 - b + b * dl / avgdl))
        out.append(s)
    return torch.tensor(out)


def state_of(engine):
    return engine.snapshot()._state


def assert_index_is_rebuild(engine):
    s = state_of(engine)
    assert len(s.lexical) == len(s.ids)
    assert s.lexical.equals(LexicalIndex.build(s.texts))


# ---------------------------------------------------------------------------------------------- the index
def test_index_scores_match_the_formula():
    texts = list(DOCS.values())
    idx = LexicalIndex.build(texts)
    for q in ("capital of Paris", "Who was born in Lisbon?", "PIN", "zebra", ""):
        torch.testing.assert_close(idx.scores(q), bm25_reference(texts, q).float(), atol=1e-5, rtol=1e-5)


def test_index_scores_match_bm25s():
    bm25s = pytest.importorskip("bm25s")
    texts = list(DOCS.values()) * 3
    r = bm25s.BM25()  # lucene, k1=1.5, b=0.75: the defaults we follow
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    idx = LexicalIndex.build(texts)
    for q in ("capital of Paris", "Eiffel Tower 1889 Paris"):
        tokens = bm25s.tokenize([q], stopwords="en", return_ids=False, show_progress=False)[0]
        ref = torch.tensor(r.get_scores(tokens), dtype=torch.float32)
        torch.testing.assert_close(idx.scores(q), ref, atol=1e-4, rtol=1e-4)


def test_index_follows_add_upsert_delete_and_equals_a_rebuild(engine):
    assert_index_is_rebuild(engine)
    engine.add(["Lisbon has trams and a castle."], ids=["trams"], collection="other", progress=False)
    assert_index_is_rebuild(engine)
    engine.upsert(["Paris is the capital of France; Lyon is not."], ids=["paris"], progress=False)
    assert_index_is_rebuild(engine)
    engine.delete(["pin", "garden"])
    assert_index_is_rebuild(engine)
    engine.delete(["trams"], collection=ALL_COLLECTIONS)
    assert_index_is_rebuild(engine)
    # the ranking follows too: the deleted document is gone, the replaced text is what is matched
    ids = [d.id for d in engine.retrieve("Lyon", routing="lexical")]
    assert ids == ["paris"]
    assert engine.retrieve("PIN 4321", routing="lexical") == []


def test_an_old_snapshot_keeps_its_index(engine):
    snap = engine.snapshot()
    engine.add(["Zebras live in Kenya."], ids=["zebra"], progress=False)
    assert snap._state.lexical.scores("zebras kenya").abs().sum() == 0  # new terms are invisible to it
    assert [d.id for d in engine.retrieve("zebras kenya", routing="lexical")] == ["zebra"]
    assert engine.retrieve("zebras kenya", routing="lexical", snapshot=snap) == []


def test_long_documents_index_their_parts(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, max_doc_tokens=12)
    e.add(["alpha beta gamma " * 6 + "omega"], ids=["long"], progress=False)
    assert len(e.snapshot()) > 1
    assert_index_is_rebuild(e)
    assert [d.id for d in e.retrieve("omega", routing="lexical")][0].startswith("long#")


# ---------------------------------------------------------------------------------------------- storage
def test_index_survives_save_and_load(engine, tmp_path, tiny_model_dir):
    engine.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["lexical"]["tokenizer"] == lexical.TOKENIZER_VERSION
    assert "lexical" not in manifest["fingerprint"]  # the model's fingerprint does not depend on it
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3)
    other.load(tmp_path / "m")
    assert state_of(other).lexical.equals(state_of(engine).lexical)
    q = "capital of France"
    assert [d.id for d in other.retrieve(q, routing="hybrid")] == [d.id for d in engine.retrieve(q, routing="hybrid")]
    # still incremental after a load
    other.add(["Porto is north of Lisbon."], ids=["porto"], progress=False)
    assert_index_is_rebuild(other)


def test_a_save_writes_no_word_of_a_deleted_document(engine, tmp_path, tiny_model_dir):
    """The shared vocab only grows, so it still holds a deleted document's words; the saved index holds only the
    words of the documents kept, and scores exactly as the index in RAM does."""
    engine.add(["Quintessa smuggled marzipan through Reykjavik."], ids=["secret"], progress=False)
    engine.save(tmp_path / "m")
    engine.delete(["secret", "pin"])
    assert "quintessa" in state_of(engine).lexical.vocab  # still in RAM (older snapshots may read it)
    engine.save(tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        if f.is_file():
            assert b"quintessa" not in f.read_bytes().lower() and b"4321" not in f.read_bytes(), f.name
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3)
    other.load(tmp_path / "m")
    saved, live = state_of(other).lexical, state_of(engine).lexical
    assert saved.equals(live) and saved.n_terms < live.n_terms
    for q in ("capital of France", "Quintessa marzipan", "Ana's bank PIN", "tower 1889 lighthouse"):
        assert torch.equal(saved.scores(q), live.scores(q)), q
    assert saved.compacted() is saved  # nothing left to drop


def test_memory_without_index_or_of_another_tokenizer_is_reindexed(engine, tmp_path, tiny_model_dir):
    engine.save(tmp_path / "m")
    path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["lexical"]["tokenizer"] = "some-older-version"
    path.write_text(json.dumps(manifest))
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    other.load(tmp_path / "m")
    assert_index_is_rebuild(other)
    del manifest["lexical"]  # a memory saved before the index existed
    path.write_text(json.dumps(manifest))
    other.load(tmp_path / "m")
    assert_index_is_rebuild(other)


def _rewrite_tensors(folder, change):
    """Rewrite the tensors file with `change(tensors)` applied and a manifest that matches it (size,
    checksum): only the structure checks can catch what was altered."""
    manifest = json.loads((folder / "manifest.json").read_text())
    tpath = folder / manifest["tensors"]["file"]
    tensors = {k: v.clone() for k, v in storage.mmap_safetensors(str(tpath)).items()}
    change(tensors)
    os.remove(tpath)
    nbytes, sha = storage.write_safetensors(str(tpath), tensors)
    manifest["tensors"].update(bytes=nbytes, sha256=sha)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change", [
    lambda t: t["lex_terms"].__setitem__(0, 10 ** 6),  # a term id outside the vocabulary
    lambda t: t["lex_tf"].__setitem__(0, 0),  # a zero count
    lambda t: t.update(lex_row_offsets=t["lex_row_offsets"][:-1]),  # rows do not match the documents
    lambda t: t.pop("lex_vocab"),  # a missing tensor
    lambda t: t.update(lex_vocab=torch.full_like(t["lex_vocab"], 0xFF)),  # not UTF-8
], ids=["term-id", "zero-tf", "row-offsets", "missing", "utf8"])
def test_tampered_index_fails_load(engine, tmp_path, tiny_model_dir, change):
    engine.save(tmp_path / "m")
    _rewrite_tensors(tmp_path / "m", change)
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    with pytest.raises(MemoryFormatError, match="lexical"):
        other.load(tmp_path / "m")


def test_flipped_index_byte_fails_the_checksum(engine, tmp_path, tiny_model_dir):
    engine.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    tpath = tmp_path / "m" / manifest["tensors"]["file"]
    raw = bytearray(tpath.read_bytes())
    raw[-3] ^= 0x01  # the vocabulary's bytes come last (1-byte elements are laid out last)
    tpath.write_bytes(bytes(raw))
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    with pytest.raises(MemoryFormatError, match="checksum"):
        other.load(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- fusion
def rrf_reference(rankings, k):
    scores = {}
    for rows in rankings:
        for i, r in enumerate(rows):
            scores[r] = scores.get(r, 0) + 1 / (RRF_K + i + 1)
    return sorted(scores, key=lambda r: (-scores[r], r))[:k]


def zsum_reference(lists, k):
    zs = []
    for rows, scores in lists:
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) or 1e-12
        zs.append({r: (s - mean) / sd for r, s in zip(rows, scores)})
    total = {r: sum(z.get(r, min(z.values())) for z in zs) for z in zs for r in z}
    return sorted(total, key=lambda r: (-total[r], r))[:k]


def test_fusion_rules_match_plain_references():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        lists = []
        for _ in range(2):
            rows = torch.randperm(30, generator=g)[:int(torch.randint(2, 15, (1,), generator=g))].tolist()
            scores = sorted(torch.rand(len(rows), generator=g).tolist(), reverse=True)
            lists.append((rows, scores))
        assert fuse(lists, 7, "rrf")[0] == rrf_reference([r for r, _ in lists], 7)
        assert fuse(lists, 7, "zsum")[0] == zsum_reference(lists, 7)
    with pytest.raises(ValueError):
        fuse(lists, 3, "max")


def test_hybrid_retrieval_is_the_fusion_of_both_rankings(engine):
    """The default rule (zsum) over the engine's two rankings equals the plain reference."""
    q = "Who was born in Lisbon?"
    msa, bm25 = engine.retrieve(q, k=6, routing="msa"), engine.retrieve(q, k=6, routing="lexical")
    want = zsum_reference([([d.id for d in msa], [d.score for d in msa]),
                           ([d.id for d in bm25], [d.score for d in bm25])], 3)
    got = engine.retrieve(q, routing="hybrid")
    assert engine.config.hybrid_fusion == "zsum" and [d.id for d in got] == want
    assert engine.retrieve(q)[0].score != got[0].score  # pure MSA stays the default


def test_filters_and_collections_apply_to_both_rankings_before_fusion(engine):
    engine.add(["Bob was born in Lisbon too."], ids=["bob"], collection="people", progress=False)
    q = "born in Lisbon"
    for routing in ("hybrid", "lexical"):
        ids = [d.id for d in engine.retrieve(q, k=6, routing=routing)]
        assert "bob" not in ids
        assert [d.id for d in engine.retrieve(q, routing=routing, collection="people")] == ["bob"]
        allowed = {"paris", "garden", "tower"}
        got = [d.id for d in engine.retrieve(q, k=6, routing=routing, where=allowed)]
        assert set(got) <= allowed
        assert engine.retrieve(q, routing=routing, where=lambda d: d.id == "lisbon")[0].id == "lisbon"
    # a filter admitting only BM25's non-matches: hybrid still ranks them by the router
    got = [d.id for d in engine.retrieve(q, k=2, routing="hybrid", where=["garden", "lighthouse"])]
    assert sorted(got) == ["garden", "lighthouse"]


def test_hybrid_answers_and_sparse_mode_read_the_fused_selection(engine):
    q = "Who was born in Lisbon?"
    fused = [d.id for d in engine.retrieve(q, routing="hybrid")]
    res = engine.query(q, routing="hybrid")
    assert [d.id for d in res.documents] == fused
    res = engine.query(q, routing="hybrid", mode="sparse")
    assert [d.id for d in res.documents] == fused
    assert all(ids == fused for ids, _ in res.per_layer.values())
    with pytest.raises(InvalidArgumentError, match="routing"):
        engine.query(q, routing="bm42")


def test_rrf_fusion_is_a_config_choice(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, hybrid_fusion="rrf")
    e.add(list(DOCS.values()), ids=list(DOCS), progress=False)
    q = "capital of France"
    msa = [d.id for d in e.retrieve(q, k=6, routing="msa")]
    bm25 = [d.id for d in e.retrieve(q, k=6, routing="lexical")]
    want = rrf_reference([msa, bm25], 3)
    got = e.retrieve(q, routing="hybrid")
    assert [d.id for d in got] == want
    assert got[0].score == pytest.approx(sum(1 / (RRF_K + r.index(want[0]) + 1) for r in (msa, bm25) if want[0] in r))


# ---------------------------------------------------------------------------------------------- rounds
def zscores_reference(scores):
    n = len(scores)
    if n < 2:
        return [0.0] * n
    mean = sum(scores) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / n)
    return [(x - mean) / max(std, 1e-12) for x in scores]


CHAIN_DOCS = {**DOCS,
              "porto": "Porto is a city in Portugal on the Douro river, famous for its wine.",
              "douro": "The Douro river flows from Spain through northern Portugal to the Atlantic.",
              "keeper": "Alice became a lighthouse keeper on an island near Porto.",
              "wine": "Port wine is aged in cellars along the river in Porto.",
              "louvre": "The Louvre in Paris is the world's most visited museum.",
              "bank": "The bank on the river in Lisbon opened in 1920.",
              "atlantic": "The Atlantic island was reached by rowing boat in winter."}


def chain_rounds_reference(engine, q, k, rounds, routing=None, depth=100):
    """Rounds by their definition, through the public API: round r routes the question with each chain's
    texts (root first) as context over the documents not found yet, reading each ranking `depth` deep (the
    question's own at least k deep: `query` reads its top k for abstention, and `retrieve` routes alike); a
    candidate's chain score = its parent chain's score + its own z-score in that ranking (round 1: its z-score
    in the question's ranking), best parent; the round keeps its share of k, best chain first, ties by bank
    order. -> [[(id, score), ...] per round]."""
    order = [d.id for d in engine.snapshot().documents()]
    text = {d.id: d.text for d in engine.snapshot().documents()}
    n_rounds = min(rounds, k)

    def share(r, found):
        return math.ceil((k - found) / (n_rounds - r))

    n = share(0, 0)
    whole = engine.route(q, k=max(k, depth), routing=routing)
    z = zscores_reference(whole.scores)
    out = [list(zip(whole.ids[:n], whole.scores[:n]))]
    ends = [(z[i], [whole.ids[i]]) for i in range(len(out[0]))]
    found = len(out[0])
    for r in range(1, n_rounds):
        seen = {d for docs in out for d, _ in docs}
        rest = [d for d in order if d not in seen]
        n = share(r, found)
        if not rest:
            break
        best = {}
        for p, (parent_chain, path) in enumerate(ends):
            got = engine.route(q, k=max(n, depth), context="\n\n".join(text[d] for d in path), where=rest,
                               routing=routing)
            for d, score, zz in zip(got.ids, got.scores, zscores_reference(got.scores)):
                if d not in best or parent_chain + zz > best[d][0]:
                    best[d] = (parent_chain + zz, score, p)
        chosen = sorted(best, key=lambda d: (-best[d][0], order.index(d)))[:n]
        out.append([(d, best[d][1]) for d in chosen])
        ends = [(best[d][0], ends[best[d][2]][1] + [d]) for d in chosen]
        found += len(chosen)
    return out


@pytest.fixture()
def chain_engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, max_new_tokens=2)
    e.add(list(CHAIN_DOCS.values()), ids=list(CHAIN_DOCS), progress=False)
    return e


@pytest.mark.parametrize("routing", ["msa", "hybrid", "lexical"])
@pytest.mark.parametrize("k,rounds,depth", [(5, 2, None), (7, 3, None), (7, 3, 4), (6, 4, 3)])
def test_chain_rounds_equal_their_definition(chain_engine, monkeypatch, routing, k, rounds, depth):
    """Against the reference above on 13 documents: deeper chains (rounds 3 and 4: each chain's texts, root
    first, route the next round), and rankings read only `depth` deep (the engine's FUSION_DEPTH patched)."""
    if depth is not None:
        monkeypatch.setattr("msa_plugins.core.FUSION_DEPTH", depth)
    q = "Where was the lighthouse keeper born?"
    want = chain_rounds_reference(chain_engine, q, k, rounds, routing, depth or 100)
    got = chain_engine.retrieve(q, k=k, rounds=rounds, routing=routing)
    assert [(d.id, d.round) for d in got] == [(d, r) for r, docs in enumerate(want) for d, _ in docs]
    assert [d.score for d in got] == pytest.approx([s for docs in want for _, s in docs])
    assert len(got) == k and len({d.id for d in got}) == k


def test_concat_round_routing_routes_once_with_every_found_text(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, round_routing="concat")
    e.add(list(DOCS.values()), ids=list(DOCS), progress=False)
    q = "Who was born in Lisbon?"
    got = e.retrieve(q, k=5, rounds=2)
    first = e.retrieve(q, k=3)
    assert [d.id for d in got[:3]] == [d.id for d in first] and [d.round for d in got] == [0, 0, 0, 1, 1]
    again = e.route(q, k=2, context="\n\n".join(d.text for d in first),
                    where=[d for d in DOCS if d not in {x.id for x in first}])
    assert [d.id for d in got[3:]] == again.ids and [d.score for d in got[3:]] == again.scores
    with pytest.raises(InvalidArgumentError, match="round_routing"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", round_routing="joint")


def test_extend_chains_against_hand_computed_beams():
    from msa_plugins.engine.routing import extend_chains, zscores

    assert zscores([3.0]) == [0.0] and zscores([]) == []
    assert zscores([1.0, 3.0]) == pytest.approx([-1.0, 1.0])
    # parent 0 (chain 1.5) ranks rows 7, 5; parent 1 (chain 0.0) ranks rows 5, 9, 2
    z1 = zscores_reference([2.0, 1.0, 0.0])
    links = extend_chains([(1.5, [7, 5], [0.9, 0.1]), (0.0, [5, 9, 2], [2.0, 1.0, 0.0])], 3)
    # row 7: 1.5 + 1 = 2.5; row 5: the better of 1.5 - 1 = 0.5 and 0 + z1[0] = 1.22 (not their sum);
    # row 9: 0 + 0 = 0; row 2: -1.22
    assert [x.row for x in links] == [7, 5, 9]
    assert [x.parent for x in links] == [0, 1, 1]
    assert [x.chain for x in links] == pytest.approx([2.5, z1[0], 0.0])
    assert [x.score for x in links] == [0.9, 2.0, 1.0]  # a link keeps its score in the ranking that found it
    tie = extend_chains([(0.0, [4, 3], [1.0, 1.0])], 2)  # equal chains: the lower row first
    assert [x.row for x in tie] == [3, 4]
    assert extend_chains([], 2) == []


def test_routing_choices_of_the_config_match_the_engine():
    from msa_plugins import config
    from msa_plugins.engine import routing

    assert config.FUSIONS == routing.FUSIONS and config.ROUND_ROUTINGS == routing.ROUND_ROUTINGS


@pytest.mark.parametrize("routing", ["msa", "hybrid", "lexical"])
def test_a_deep_routing_cut_to_k_is_routing_with_k(chain_engine, routing):
    q = "Where was the lighthouse keeper born?"
    want = chain_engine.route(q, k=3, routing=routing)
    got = chain_engine.route(q, k=len(CHAIN_DOCS), routing=routing).top(3)
    assert (got.ids, got.scores, got.rows, got.router_scores) == (want.ids, want.scores, want.rows, want.router_scores)
    assert got.per_layer == want.per_layer
    assert torch.equal(got.per_layer_rows, want.per_layer_rows)


def test_interleave_routes_the_question_alone_once(engine, monkeypatch):
    calls = []
    route = engine.route
    monkeypatch.setattr(engine, "route", lambda *a, **kw: calls.append(kw.get("context", "")) or route(*a, **kw))
    res = engine.query("Who was born in Lisbon?", k=2, rounds=2, mode="interleave", max_new_tokens=1)
    assert calls.count("") == 1 and len(calls) == 3  # the question, then one routing per round-1 document
    assert len(res.documents) == 4


@pytest.mark.parametrize("routing", ["msa", "hybrid"])
@pytest.mark.parametrize("k,rounds", [(2, 2), (3, 2), (2, 3)])
def test_interleave_rounds_route_like_retrieve_with_k_per_round(chain_engine, routing, k, rounds):
    q = "Where was the lighthouse keeper born?"
    res = chain_engine.query(q, k=k, rounds=rounds, routing=routing, mode="interleave", max_new_tokens=1)
    want = chain_engine.retrieve(q, k=k, rounds=rounds, routing=routing, k_per_round=True)
    assert [(d.id, d.round, d.score) for d in res.documents] == [(d.id, d.round, d.score) for d in want]
    assert len(want) == k * rounds and [d.round for d in want] == [r for r in range(rounds) for _ in range(k)]


@pytest.mark.parametrize("routing", ["msa", "hybrid"])
@pytest.mark.parametrize("k,rounds,depth,where", [(1, 2, None, None), (3, 2, None, None), (5, 2, None, None),
                                                  (4, 3, None, None), (2, 4, None, None), (8, 2, 3, None),
                                                  (5, 2, None, 6)])
def test_interleave_with_k_in_all_routes_like_retrieve(chain_engine, monkeypatch, routing, k, rounds, depth, where):
    """k_per_round=False: k documents in all, split over the rounds exactly as retrieve(rounds=) splits them
    (k=5 in 2 rounds: 3 + 2; fewer documents than rounds: one round per document), also with k deeper than
    the rankings are read (FUSION_DEPTH patched) and with a filter."""
    if depth is not None:
        monkeypatch.setattr("msa_plugins.core.FUSION_DEPTH", depth)
    allowed = list(CHAIN_DOCS)[-where:] if where else None
    q = "Where was the lighthouse keeper born?"
    res = chain_engine.query(q, k=k, rounds=rounds, k_per_round=False, routing=routing, mode="interleave",
                             max_new_tokens=1, where=allowed)
    want = chain_engine.retrieve(q, k=k, rounds=rounds, routing=routing, where=allowed)
    assert [(d.id, d.round, d.score) for d in res.documents] == [(d.id, d.round, d.score) for d in want]
    assert len(res.documents) == k and len(res.rounds) == min(k, rounds)
    assert allowed is None or {d.id for d in res.documents} <= set(allowed)


def test_the_eval_answers_from_k_documents_in_all_rounds(engine):
    from types import SimpleNamespace

    from msa_plugins.integrations.ragas.ab import EngineMemory, SystemSpec, msa_system_fn

    q = "Who was born in Lisbon?"
    plan = SimpleNamespace(retrieval_only=False, mode="interleave", k=4, rounds=2, max_new_tokens=1)
    answer = msa_system_fn(EngineMemory(engine), SystemSpec("msa", "msa", None), plan)
    assert [c.doc_id for c in answer(q).contexts] == [d.id for d in engine.retrieve(q, k=4, rounds=2)]


# ---------------------------------------------------------------------------------------------- late scoring
def test_late_interaction_is_fingerprinted_and_routes(engine, tiny_model_dir, tmp_path):
    late = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=3, doc_score="late")
    assert late.fingerprint()["doc_score"] == "late" and "doc_score" not in engine.fingerprint()
    late.add(list(DOCS.values()), ids=list(DOCS), progress=False)
    got = late.retrieve("Who was born in Lisbon?", k=6)
    assert len(got) == 6 and all(a.score >= b.score for a, b in zip(got, got[1:]))
    engine.save(tmp_path / "maxmax")
    with pytest.raises(ModelMismatchError, match="doc_score"):
        late.load(tmp_path / "maxmax")
    with pytest.raises(InvalidArgumentError, match="doc_score"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", doc_score="mean")


def test_eval_harness_runs_hybrid_and_rounds_as_their_own_systems(engine):
    from msa_plugins.integrations.ragas.ab import EnginePool, parse_systems
    from msa_plugins.integrations.ragas.msa_system import msa_retrieve_fn

    assert [s.base for s in parse_systems(["rag-bm25", "msa", "msa-hybrid"])] == ["rag-bm25", "msa", "msa-hybrid"]
    pool = EnginePool(lambda router: engine)
    assert pool.get("msa-hybrid") is pool.get("msa")  # one memory, encoded once
    q = "Who was born in Lisbon?"
    assert [d for d, _ in msa_retrieve_fn(engine, routing="hybrid")(q, 3)] == \
        [d.id for d in engine.retrieve(q, routing="hybrid")]
    two = msa_retrieve_fn(engine, rounds=2)(q, 4)
    assert [d for d, _ in two] == [d.id for d in engine.retrieve(q, k=4, rounds=2)]


def test_retrieval_eval_scores_each_k_of_a_multi_round_system_from_its_own_call(engine):
    """With rounds, recall@k is k documents split over the rounds (k=5: 3 + 2), not the top k of one deeper
    call (whose first round alone holds its top 10); single-shot systems keep one deep call and the curve."""
    from msa_plugins.integrations.ragas.datasets import EvalDoc, EvalQuestion, EvalSet
    from msa_plugins.integrations.ragas.harness import run_retrieval_eval
    from msa_plugins.integrations.ragas.msa_system import msa_retrieve_fn
    from msa_plugins.metrics import retrieval_scores

    q = "Who was born in Lisbon?"
    gold = [d.id for d in engine.retrieve(q, k=5, rounds=2)][3:]  # the second round's documents
    es = EvalSet("tiny", [EvalDoc(i, t) for i, t in DOCS.items()], [EvalQuestion("q", q, ["x"], gold)])
    ks = (1, 3, 5)
    result = run_retrieval_eval(es, {"two": msa_retrieve_fn(engine, rounds=2), "one": msa_retrieve_fn(engine)},
                                ks=ks, progress=False)
    two, one = (next(r for r in result.records if r["system"] == n) for n in ("two", "one"))
    for k in ks:
        want = [d.id for d in engine.retrieve(q, k=k, rounds=2)]
        assert two["retrieved_at_k"][str(k)] == want
        assert two["scores"][f"recall@{k}"] == retrieval_scores(want, gold, [k])[f"recall@{k}"]
    assert two["scores"]["recall@5"] == 1.0  # both gold documents come in round 2 of k=5
    assert "recall_curve" not in two and len(one["recall_curve"]) > 0
    deep = [d.id for d in engine.retrieve(q, k=len(DOCS))]
    assert [d["doc_id"] for d in one["retrieved"]] == deep
    assert one["scores"]["recall@5"] == retrieval_scores(deep, gold, [5])["recall@5"]
