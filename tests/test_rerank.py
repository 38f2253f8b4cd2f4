"""Reranking by the engine model's own question likelihood (engine/rerank.py): the batched path against the
one-passage-at-a-time reference, on every supported model family."""

import math

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.errors import InvalidArgumentError
from msa_plugins.engine.rerank import (PAIR_PASSAGE_TOKENS, QUESTION_PROMPT, SHARED_PREFIX_MIN_TOKENS,
                                       fuse_with_routing, pair_texts, question_likelihood,
                                       question_likelihood_reference, shared_prefix_length)

PASSAGES = ["Paris is the capital of France.", "Alice was born in 1990 in Lisbon, the capital of Portugal.",
            "x", "The quick brown fox jumps over the lazy dog. " * 12, ""]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_batched_likelihood_equals_reference(tiny_model_dir, family):
    e = MSAEngine.from_pretrained(tiny_model_dir(family), device="cpu")
    m, tok = e.model, e.model.tokenizer
    ref = question_likelihood_reference(m, tok, "Where was Alice born?", PASSAGES, max_passage_tokens=40)
    for batch_tokens in (8192, 60, 1):  # one batch; a few; one row per batch (a row may exceed the budget)
        got = question_likelihood(m, tok, "Where was Alice born?", PASSAGES, max_passage_tokens=40,
                                  batch_tokens=batch_tokens)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
    assert all(math.isfinite(x) and x < 0 for x in ref)
    assert len(set(round(x, 6) for x in ref)) > 1  # the passages make a difference
    assert question_likelihood(m, tok, "q?", []) == []


ANCHOR = "Alice Smith (born 1990) is a chemist from Lisbon who studied catalysis at the University of Porto. " * 3


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_prompts_sharing_a_start_run_it_once_and_score_as_the_reference(tiny_model_dir, family, monkeypatch):
    """Path scoring's rows all start with the anchor: that start runs once, as the cache prefix of every row, and
    the scores equal the one-passage-at-a-time reference (which runs every prompt whole)."""
    e = MSAEngine.from_pretrained(tiny_model_dir(family), device="cpu")
    m, tok = e.model, e.model.tokenizer
    texts = pair_texts(ANCHOR, PASSAGES)
    q = "Where was the chemist born?"
    ref = question_likelihood_reference(m, tok, q, texts, max_passage_tokens=PAIR_PASSAGE_TOKENS)

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    longest = (max(len(ids("Passage: " + t)[:PAIR_PASSAGE_TOKENS]) for t in texts)
               + len(ids(QUESTION_PROMPT)) + len(ids(" " + q)))  # the longest whole prompt + question
    forwarded = []
    real_forward = m.forward

    def counting(ids, positions, **kw):
        forwarded.append(ids.shape)
        return real_forward(ids, positions, **kw)

    m.forward = counting
    try:
        for batch_tokens in (8192, 60, 1):
            forwarded.clear()
            got = question_likelihood(m, tok, q, texts, max_passage_tokens=PAIR_PASSAGE_TOKENS,
                                      batch_tokens=batch_tokens)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
            shared = forwarded[0][1]
            assert forwarded[0][0] == 1 and shared >= len(ids("Passage: " + ANCHOR)) - 2  # the anchor: once, first
            assert max(s for _, s in forwarded[1:]) + shared <= longest  # the rows run their own tokens only
        monkeypatch.setenv("MSA_RERANK_PREFIX", "off")  # the path from before: every prompt whole
        forwarded.clear()
        got = question_likelihood(m, tok, q, texts, max_passage_tokens=PAIR_PASSAGE_TOKENS)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-4)
        assert forwarded == [(len(texts), longest)]
        monkeypatch.setenv("MSA_RERANK_PREFIX", "yes")
        with pytest.raises(InvalidArgumentError, match="MSA_RERANK_PREFIX='yes'; use 'shared' or 'off'"):
            question_likelihood(m, tok, q, texts)
    finally:
        m.forward = real_forward
    assert len(set(round(x, 6) for x in ref)) > 1


def test_shared_prefix_length_leaves_every_row_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: the last token stays each row's
    assert shared_prefix_length([[1, 2, 3]]) == 0  # one prompt: nothing to share
    assert shared_prefix_length([[1], [1]]) == 0
    assert SHARED_PREFIX_MIN_TOKENS > 2  # every UPR prompt starts with "Passage:"; that alone is not worth a forward


def test_long_passages_are_cut_and_the_cut_is_what_counts(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    m, tok = e.model, e.model.tokenizer
    long = "The quick brown fox jumps over the lazy dog. " * 50
    a = question_likelihood(m, tok, "What jumps?", [long, long + " Paris."], max_passage_tokens=30)
    assert a[0] == pytest.approx(a[1], abs=1e-6)  # the text past the cut is not read


def test_fusion_sums_z_scores():
    assert fuse_with_routing([1.0, 2.0, 3.0], [-3.0, -2.0, -1.0]) == pytest.approx([-2.449, 0.0, 2.449], abs=1e-3)
    assert fuse_with_routing([1.0, 1.0], [-1.0, -2.0]) == pytest.approx([1.0, -1.0])  # a constant signal adds 0
    assert fuse_with_routing([1.0, 2.0, 3.0], [-3.0, -2.0, -1.0], [0.0, 5.0, 5.0]) == pytest.approx(
        [-2.449 - 1.414, 0.707, 2.449 + 0.707], abs=1e-3)  # a third signal adds its z-scores too


FACTS = ["Paris is the capital of France.", "Alice was born in 1990 in Lisbon.",
         "The quick brown fox jumps over the lazy dog.", "Memory sparse attention routes each question.",
         "Bob moved to Berlin in 2004.", "The Nile flows through Egypt.", "Mount Fuji is in Japan."]


@pytest.fixture()
def engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    e.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    return e


@pytest.mark.parametrize("routing", ["msa", "hybrid"])
def test_retrieve_rerank_equals_its_definition(engine, routing):
    """rerank=N: the router's top N (max(N, k)), reordered by the fused score, written out here from public
    pieces and the reference likelihood."""
    q = "Where was Alice born?"
    routed = engine.retrieve(q, k=5, routing=routing)
    like = question_likelihood_reference(engine.model, engine.model.tokenizer, q, [d.text for d in routed])
    fused = fuse_with_routing([d.score for d in routed], like)
    want = sorted(zip(fused, range(5), [d.id for d in routed]), key=lambda t: (-t[0], t[1]))
    got = engine.retrieve(q, k=3, routing=routing, rerank=5)
    assert [d.id for d in got] == [i for _, _, i in want[:3]]
    assert [d.score for d in got] == pytest.approx([f for f, _, _ in want[:3]], abs=1e-4)
    deeper = engine.retrieve(q, k=5, routing=routing, rerank=2)  # the depth is at least k
    assert [d.id for d in deeper] == [i for _, _, i in want]


@pytest.mark.parametrize("routing", ["msa", "hybrid"])
def test_path_rerank_equals_its_definition(tiny_model_dir, routing):
    """rerank_scoring="path": the top N by z(routing) + z(likelihood alone) + z(likelihood given the anchor's text
    first), the anchor being the top of the first two terms' sum (scored with itself in front). Written out here
    from public pieces and the reference likelihood."""
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", rerank_scoring="path")
    e.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    m, tok, q = e.model, e.model.tokenizer, "Where was Alice born?"
    routed = e.retrieve(q, k=5, routing=routing)
    scores, texts = [d.score for d in routed], [d.text for d in routed]
    alone = question_likelihood_reference(m, tok, q, texts)
    single = fuse_with_routing(scores, alone)
    anchor = max(range(5), key=lambda i: (single[i], -i))
    paired = question_likelihood_reference(m, tok, q, [texts[anchor] + "\n\n" + t for t in texts],
                                           max_passage_tokens=PAIR_PASSAGE_TOKENS)
    fused = fuse_with_routing(scores, alone, paired)
    want = sorted(zip(fused, range(5), [d.id for d in routed]), key=lambda t: (-t[0], t[1]))
    got = e.retrieve(q, k=3, routing=routing, rerank=5)
    assert [d.id for d in got] == [i for _, _, i in want[:3]]
    assert [d.score for d in got] == pytest.approx([f for f, _, _ in want[:3]], abs=1e-4)
    assert [d.score for d in got] != pytest.approx(sorted(single, reverse=True)[:3], abs=1e-4)  # the pair counts
    assert pair_texts("A.", ["B.", "C."]) == ["A.\n\nB.", "A.\n\nC."]
    res = e.query(q, k=3, rerank=5, max_new_tokens=1)
    assert [d.id for d in res.documents] == [d.id for d in got]


def test_query_answers_from_the_reranked_documents(engine):
    q = "Where was Alice born?"
    res = engine.query(q, k=2, rerank=6, max_new_tokens=2)
    assert [d.id for d in res.documents] == [d.id for d in engine.retrieve(q, k=2, rerank=6)]
    two = engine.retrieve(q, k=4, rounds=2, rerank=6)  # round 1 reranked, round 2 routes on from it (reranked too)
    assert [d.round for d in two] == [0, 0, 1, 1]
    assert [d.id for d in two[:2]] == [d.id for d in engine.retrieve(q, k=2, rerank=6)]


def _reranked(q, candidates, scores):
    """`candidates` (id, text) with their routing (or chain) scores, reordered by the fused score, written out
    from the reference likelihood: [(id, fused score)], best first, ties in the given order."""
    like = question_likelihood_reference(_reranked.engine.model, _reranked.engine.model.tokenizer, q,
                                         [t for _, t in candidates])
    fused = fuse_with_routing(scores, like)
    order = sorted(range(len(candidates)), key=lambda i: (-fused[i], i))
    return [(candidates[i][0], fused[i]) for i in order]


@pytest.mark.parametrize("round_routing", ["chain", "concat"])
@pytest.mark.parametrize("routing", ["msa", "hybrid"])
def test_later_rounds_are_reranked_as_defined(tiny_model_dir, routing, round_routing):
    """rerank=N in 2 rounds (k=4: 2 + 2): round 1 is single-shot rerank; round 2's top max(N, 2) candidates (chains
    through round 1's documents, or the concat ranking) are reordered by z(chain or routing score) + z(question
    likelihood given the candidate). Written out here from public pieces and the reference likelihood."""
    from msa_plugins.engine.routing import FUSION_DEPTH, zscores

    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", round_routing=round_routing)
    engine.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    _reranked.engine = engine
    q, N = "Where was Alice born?", 4
    deep = engine.retrieve(q, k=N, routing=routing, rerank=N)  # round 1 routed as deep as it is reranked
    first = deep[:2]
    rest = [d.id for d in engine.snapshot().documents() if d.id not in {x.id for x in first}]
    texts = {d.id: d.text for d in engine.snapshot().documents()}
    if round_routing == "chain":
        parent_z = zscores([d.score for d in deep])[:2]
        best: dict = {}
        for z_parent, parent in zip(parent_z, first):
            got = engine.route(q, k=FUSION_DEPTH, context=parent.text, where=rest, routing=routing)
            for cid, z in zip(got.ids, zscores(got.scores)):
                if cid not in best or z_parent + z > best[cid]:
                    best[cid] = z_parent + z
        chains = sorted(best.items(), key=lambda t: -t[1])[:N]
        want = _reranked(q, [(c, texts[c]) for c, _ in chains], [s for _, s in chains])[:2]
    else:
        got = engine.route(q, k=N, context="\n\n".join(d.text for d in first), where=rest, routing=routing)
        want = _reranked(q, [(c, texts[c]) for c in got.ids], got.scores)[:2]
    two = engine.retrieve(q, k=4, rounds=2, routing=routing, rerank=N)
    assert [d.round for d in two] == [0, 0, 1, 1]
    assert [d.id for d in two[:2]] == [d.id for d in first]
    assert [(d.id, round(d.score, 4)) for d in two[2:]] == [(i, round(f, 4)) for i, f in want]
    res = engine.query(q, k=4, rounds=2, k_per_round=False, routing=routing, rerank=N, max_new_tokens=1)
    assert [d.id for d in res.documents] == [d.id for d in two]


@pytest.mark.parametrize("scoring", ["single", "path"])
def test_each_candidate_is_scored_once_per_question(tiny_model_dir, monkeypatch, scoring):
    """Round 2's candidates overlap round 1's reranked ones: each candidate's likelihood alone, and with path
    scoring each (anchor, candidate) pair's, is computed once."""
    import msa_plugins.core as core

    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", rerank_scoring=scoring)
    e.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    scored = []
    real = core.question_likelihood

    def counting(model, tokenizer, question, passages, **kw):
        scored.extend(passages)
        return real(model, tokenizer, question, passages, **kw)

    monkeypatch.setattr(core, "question_likelihood", counting)
    two = e.retrieve("Where was Alice born?", k=4, rounds=2, rerank=6)
    assert [d.round for d in two] == [0, 0, 1, 1]
    pairs = [p for p in scored if "\n\n" in p]  # no fact holds a blank line: these are anchor + candidate
    assert scored and len(scored) == len(set(scored)) and len(scored) - len(pairs) <= len(FACTS)
    assert bool(pairs) == (scoring == "path")


def test_rerank_bad_values_are_refused(engine):
    from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAConfig

    with pytest.raises(InvalidArgumentError, match="rerank must be >= 0"):
        engine.retrieve("q?", rerank=-1)
    with pytest.raises(InvalidTypeError, match="rerank must be an int"):
        engine.query("q?", rerank=True)
    with pytest.raises(InvalidArgumentError, match="mode 'sparse'"):
        engine.query("q?", mode="sparse", rerank=5)
    with pytest.raises(InvalidArgumentError, match="rerank_scoring"):
        MSAConfig(rerank_scoring="pairs")


def test_eval_rerank_systems_share_the_msa_memory_and_rerank():
    from msa_plugins.integrations.ragas.ab import EnginePool, parse_systems

    specs = parse_systems(["rag-minilm", "msa", "msa-rerank", "msa-hybrid-rerank"])
    assert [s.base for s in specs] == ["rag-minilm", "msa", "msa-rerank", "msa-hybrid-rerank"]
    built = []
    pool = EnginePool(lambda router: built.append(router) or object())
    assert pool.get("msa-rerank") is pool.get("msa") is pool.get("msa-hybrid-rerank") and built == [None]


def test_a_question_too_long_to_rerank_is_refused_not_cut(tmp_path):
    from tiny_models import make_tiny_model

    from msa_plugins import InputTooLongError

    e = MSAEngine.from_pretrained(make_tiny_model("llama", str(tmp_path / "m"), max_position_embeddings=96),
                                  device="cpu")
    e.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
    long_q = "Where was Alice born " * 8 + "?"
    assert e.retrieve(long_q, k=2)  # routing reads it
    with pytest.raises(InputTooLongError, match="drop rerank"):
        e.retrieve(long_q, k=2, rerank=4)
    got = question_likelihood(e.model, e.model.tokenizer, "Where?", [FACTS[3] * 20])  # a long passage is cut
    assert len(got) == 1 and math.isfinite(got[0])


def test_eval_refuses_a_rerank_system_in_sparse_mode_before_any_work():
    from msa_plugins import InvalidArgumentError
    from msa_plugins.integrations.ragas.ab import run_eval

    def no_engine(router):
        raise AssertionError("nothing may be built")

    with pytest.raises(InvalidArgumentError, match="mode 'sparse'"):
        run_eval(dataset="hotpotqa", systems=["msa-rerank"], mode="sparse", engine_factory=no_engine)
