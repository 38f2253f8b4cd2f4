"""Router training on cached features, on tiny random models: mechanics, not quality.
Also: training checkpoints never unpickle, NaN/inf routers are refused."""

import json
import math
import os
import shutil

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine.router import Router
from msa_plugins.engine.training import (FeatureCache, TrainableRouter, infonce, init_router_weights,
                                         inverse_cloze_pairs, routing_loss)
from msa_plugins.errors import (InvalidArgumentError, MemoryFormatError, ModelMismatchError, PathNotFoundError,
                                RouterMismatchError)
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import (TrainConfig, build_features, evaluate, split_queries, train, train_router_for,
                                 training_free_router)

LAYERS = [2, 3]
DOCS = [
    ("paris", "Paris", "Paris is the capital of France. It lies on the Seine and has many museums."),
    ("alice", "Alice", "Alice was born in 1990 in Lisbon. She works as a painter in the old town."),
    ("fox", "Fox", "The quick brown fox jumps over the lazy dog. The dog sleeps all day long."),
    ("msa", "Memory", "Memory sparse attention routes each question to a few documents of the bank."),
]
TEXTS = [f"{t}\n{x}" for _, t, x in DOCS]  # the bank text of a titled document
IDS = [d for d, _, _ in DOCS]
QUIET = dict(log=lambda *_: None)


def _engine(tiny_model_dir, **kw):
    return MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", routing_layers=LAYERS, chunk_size=4, **kw)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """Training-free routing, its memory holding DOCS (what the cached features must route like)."""
    e = _engine(tiny_model_dir)
    e.add(TEXTS, ids=IDS, progress=False)
    return e


@pytest.fixture(scope="module")
def cache(engine):
    qs = [("What is the capital of France?", ["paris"]), ("Where was Alice born?", ["alice"])]
    return build_features(engine, DOCS, qs, ict_per_doc=1, ict_titles=True, seed=0, progress=False)


def _router(engine, init="tied-random", seed=0):
    m = engine.model
    wq, wk = init_router_weights(m, LAYERS, init, seed)
    return Router(wq, wk, m.n_heads, m.n_kv_heads, m.head_dim, meta={"t": 1})


def _assert_routes_like_engine(tr, cache, engine, q_idx):
    """Cached-feature scores of queries q_idx == the engine's own routing of their text (ids and scores)."""
    for q in q_idx:
        s = tr.scores(cache, [q]).mean(0)[0].detach()
        got = engine.route(cache.q_text[q], k=len(DOCS))
        torch.testing.assert_close(torch.tensor(got.scores), s.sort(descending=True).values, atol=1e-4, rtol=1e-4)
        assert [cache.doc_ids[i] for i in s.argsort(descending=True).tolist()] == got.ids


def test_cached_question_features_route_like_the_engine(engine, cache):
    """Every cached query (questions and inverse-cloze pairs) scores as `engine.route` scores its text:
    the features are the engine's own question states, on the prompt routing builds."""
    tr = TrainableRouter.from_router(training_free_router(engine))  # Llama: == the engine's QKRouter
    _assert_routes_like_engine(tr, cache, engine, range(cache.n_queries))


def test_cache_describes_the_bank_and_roundtrips(engine, cache, tmp_path):
    assert cache.doc_ids == IDS
    n_tokens = [d.n_tokens for d in engine.snapshot().get(IDS)]
    assert cache.doc_start.diff().tolist() == [math.ceil(n / 4) for n in n_tokens]  # chunks of 4 tokens
    assert cache.meta["n_tokens"] == sum(n_tokens)
    assert cache.query_indices(["question"]) == [0, 1]
    kinds = cache.q_kind  # questions, then every title, then every sentence: the order seeded splits rely on
    assert kinds == sorted(kinds, key=["question", "ict-title", "ict-sentence"].index) and "ict-title" in kinds
    assert cache.q_pos[0] == [0] and cache.q_pos[1] == [1]
    assert len(cache.query_indices(["ict"])) >= len(DOCS)
    cache.save(str(tmp_path / "c"), dtype=torch.float32)
    back = FeatureCache.load(str(tmp_path / "c"))
    assert torch.equal(back.inputs, cache.inputs) and torch.equal(back.q_inputs, cache.q_inputs)
    assert back.q_pos == cache.q_pos and back.q_kind == cache.q_kind and torch.equal(back.q_start, cache.q_start)


def test_query_features_are_kept_in_fp16_and_score_as_their_fp32_reference(engine, cache, tmp_path):
    """Query features (one row per query token: most of a cache) are kept in fp16, half the RAM, and scored in
    fp32. The reference: the same queries' features kept in fp32 as the model makes them; the scores agree up
    to fp16 rounding and rank the documents alike. Saved and loaded, they stay fp16."""
    from msa_plugins.trainer import query_features

    assert cache.q_inputs.dtype == torch.float16 and cache.inputs.dtype == torch.float32
    exact = query_features(engine, cache.q_text, dtype=torch.float32)
    assert all(x.dtype == torch.float32 for x in exact)
    ref = FeatureCache(cache.layers, cache.doc_ids, cache.doc_start, cache.chunk_doc, cache.inputs, list(cache.q_text),
                       list(cache.q_kind), list(cache.q_pos), cache.q_start, torch.cat(exact, dim=1))
    ref.check()
    assert ref.q_inputs.dtype == torch.float32 and cache.q_inputs.nbytes * 2 == ref.q_inputs.nbytes
    tr = TrainableRouter.from_router(_router(engine, "random", seed=5))
    q = list(range(cache.n_queries))
    got, want = tr.scores(cache, q).detach(), tr.scores(ref, q).detach()
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert torch.equal(got.mean(0).argmax(-1), want.mean(0).argmax(-1))
    cache.save(str(tmp_path / "c"))
    assert FeatureCache.load(str(tmp_path / "c")).q_inputs.dtype == torch.float16


def test_packed_query_features_are_adopted_by_an_empty_cache_and_checked(tmp_path):
    """The first packed features a cache gets are kept as they are (no second copy of the largest tensor);
    lengths that do not add up to the tokens are refused; later ones are appended after them."""
    L, hid = 1, 4
    cache = FeatureCache([0], ["a", "b"], torch.arange(3), torch.arange(2), torch.randn(L, 2, hid))
    feats = torch.randn(L, 5, hid).half()
    with pytest.raises(InvalidArgumentError, match="lengths"):
        cache.add_queries(["q1", "q2"], feats, [[0], [1]], lengths=[2, 2])
    with pytest.raises(InvalidArgumentError, match="lengths"):
        cache.add_queries(["q1", "q2"], feats, [[0], [1]])
    with pytest.raises(InvalidArgumentError, match="drop lengths"):
        cache.add_queries(["q1"], [feats[:, :2]], [[0]], lengths=[3])
    assert cache.n_queries == 0 and cache.q_inputs is None  # a refused add changes nothing
    cache.add_queries(["q1", "q2"], feats, [[0], [1]], kind=["ict-title", "ict-sentence"], lengths=[2, 3])
    assert cache.q_inputs.data_ptr() == feats.data_ptr() and cache.q_start.tolist() == [0, 2, 5]
    assert cache.q_kind == ["ict-title", "ict-sentence"]
    cache.add_queries(["q3"], [torch.ones(L, 1, hid)], [[0]], kind="d2q")
    assert cache.q_start.tolist() == [0, 2, 5, 6] and torch.equal(cache.q_inputs[:, :5], feats)
    cache.check()
    # anything else is copied, never aliased: a list of one tensor, a view of a larger packed tensor
    for given in ([feats[:, :2].clone()], feats.clone()[:, 1:3]):
        c = FeatureCache([0], ["a", "b"], torch.arange(3), torch.arange(2), torch.randn(L, 2, hid))
        c.add_queries(["q"], given, [[0]], lengths=None if isinstance(given, list) else [2])
        src = given[0] if isinstance(given, list) else given
        assert torch.equal(c.q_inputs, src) and c.q_inputs.data_ptr() != src.data_ptr() and c.q_inputs._base is None


def test_query_features_beyond_the_fp16_range_are_kept_in_fp32(tmp_path):
    """A query whose values overflow fp16 keeps the cache's queries in fp32 (never inf), saved as fp32 too."""
    L, N, hid = 1, 2, 4
    cache = FeatureCache([0], ["a", "b"], torch.arange(N + 1), torch.arange(N), torch.randn(L, N, hid))
    cache.add_queries(["small"], [torch.randn(L, 2, hid)], [[0]])
    assert cache.q_inputs.dtype == torch.float16
    big = torch.randn(L, 3, hid)
    big[0, 1, 2] = 1e5  # fp16's largest value is 65504
    cache.add_queries(["big"], [big], [[1]])
    assert cache.q_inputs.dtype == torch.float32 and float(cache.q_inputs[0, 3, 2]) == 1e5
    cache.add_queries(["after"], [torch.randn(L, 1, hid).half()], [[0]])
    assert cache.q_inputs.dtype == torch.float32 and cache.q_inputs.shape[1] == 6
    cache.check()
    cache.save(str(tmp_path / "c"))  # the default fp16 would write inf: the queries go in fp32
    back = FeatureCache.load(str(tmp_path / "c"))
    assert back.q_inputs.dtype == torch.float32 and float(back.q_inputs[0, 3, 2]) == 1e5


def test_cache_on_some_of_its_layers(engine, cache):
    """on_layers: the same documents and queries on the layers asked for, in that order; a router on those
    layers scores it as the same layers of the whole cache."""
    one = cache.on_layers([3])
    assert one.layers == [3] and one.doc_ids == cache.doc_ids and one.q_text == cache.q_text
    assert torch.equal(one.inputs[0], cache.inputs[1]) and torch.equal(one.q_inputs[0], cache.q_inputs[1])
    swapped = cache.on_layers([3, 2])
    assert torch.equal(swapped.inputs[1], cache.inputs[0]) and torch.equal(swapped.q_inputs[1], cache.q_inputs[0])
    r = _router(engine, "random", seed=2)
    q = cache.query_indices(["question"])
    both = TrainableRouter.from_router(r).scores(cache, q).detach()  # [L, B, N]
    last = Router({3: r.wq[3]}, {3: r.wk[3]}, r.n_heads, r.n_kv_heads, r.head_dim)
    torch.testing.assert_close(TrainableRouter.from_router(last).scores(one, q).detach()[0], both[1])
    with pytest.raises(ValueError):
        cache.on_layers([7])


def test_building_features_leaves_the_memory_alone(engine):
    before = engine.snapshot().ids
    build_features(engine, [("other", "", "Another document about nothing.")], ict_per_doc=1, progress=False)
    assert engine.snapshot().ids == before


def test_rekey_from_cache_equals_reencoding(tiny_model_dir, cache):
    """Keys from cached pooled inputs (training path, set_router re-key) == encoding with the router."""
    fresh = _engine(tiny_model_dir, router="none")
    router = _router(fresh, "random", seed=3)
    tr = TrainableRouter.from_router(router)
    fresh.set_router(router)  # empty bank: the router is used while encoding
    fresh.add(TEXTS, ids=IDS, progress=False)
    _assert_routes_like_engine(tr, cache, fresh, cache.query_indices(["question"]))
    # and re-keying a bank encoded with the training-free router routes the same
    other = _engine(tiny_model_dir, keep_inputs=True)
    other.add(TEXTS, ids=IDS, progress=False)
    other.set_router(router)
    _assert_routes_like_engine(tr, cache, other, cache.query_indices(["question"]))


def test_loss_falls_on_separable_toy_set():
    torch.manual_seed(0)
    L, N, hid, H, G, D = 2, 6, 16, 2, 1, 8
    centers = torch.randn(N, hid)
    inputs = centers[None].expand(L, N, hid) + 0.05 * torch.randn(L, N, hid)
    cache = FeatureCache([0, 1], [f"d{i}" for i in range(N)], torch.arange(N + 1), torch.arange(N), inputs.clone())
    qin = [(centers[i] + 0.3 * torch.randn(hid))[None, None].expand(L, 2, hid).clone() for i in range(N) for _ in range(3)]
    cache.add_queries([f"q{i}" for i in range(len(qin))], qin, [[i // 3] for i in range(len(qin))])
    cache.check()
    gen = torch.Generator().manual_seed(1)
    wq = {l: torch.randn(H * D, hid, generator=gen) for l in (0, 1)}
    wk = {l: torch.randn(G * D, hid, generator=gen) for l in (0, 1)}
    router = Router(wq, wk, H, G, D)
    cfg = TrainConfig(epochs=15, batch_size=6, lr=3e-2, seed=0, progress=False, patience=100)
    from msa_plugins.engine.training import train_router

    trained, hist = train_router(cache, list(range(cache.n_queries)), None, init_router=router, config=cfg, **QUIET)
    losses = [h["loss"] for h in hist]
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate(trained, cache, list(range(cache.n_queries)))["recall@1"] == 1.0


def test_last_epoch_router_is_the_epoch_training_stopped_at(tmp_path):
    """train_router returns the best dev epoch; last_epoch_router reads the last one from the checkpoint. The
    reference: the same training without a dev split (dev never changes the trajectory), whose falling loss
    makes its last epoch its best."""
    from msa_plugins.engine.training import train_router
    from msa_plugins.trainer import last_epoch_router

    torch.manual_seed(0)
    L, N, hid, H, G, D = 2, 6, 16, 2, 1, 8
    centers = torch.randn(N, hid)
    cache = FeatureCache([0, 1], [f"d{i}" for i in range(N)], torch.arange(N + 1), torch.arange(N),
                         (centers[None].expand(L, N, hid) + 0.05 * torch.randn(L, N, hid)).clone())
    qin = [(centers[i] + 0.3 * torch.randn(hid))[None, None].expand(L, 2, hid).clone() for i in range(N)]
    cache.add_queries([f"q{i}" for i in range(N)] + ["mislabeled"], qin + [qin[0].clone()],
                      [[i] for i in range(N)] + [[1]])
    gen = torch.Generator().manual_seed(1)
    router = Router({l: torch.randn(H * D, hid, generator=gen) for l in (0, 1)},
                    {l: torch.randn(G * D, hid, generator=gen) for l in (0, 1)}, H, G, D, meta={"from": "init"})
    for doc_score in ("maxmax", "late"):
        cfg = TrainConfig(epochs=3, batch_size=3, lr=3e-2, seed=0, progress=False, patience=100, doc_score=doc_score)
        out = tmp_path / doc_score
        best, hist = train_router(cache, list(range(N)), [N], init_router=router, config=cfg, out_dir=str(out),
                                  **QUIET)
        ref, ref_hist = train_router(cache, list(range(N)), None, init_router=router, config=cfg, **QUIET)
        losses = [h["loss"] for h in ref_hist]
        assert losses == sorted(losses, reverse=True) and [h["loss"] for h in hist[1:]] == pytest.approx(losses)
        last = last_epoch_router(str(out), router)
        assert not torch.equal(best.wq[0], last.wq[0])  # early stopping kept another epoch: the test tells them apart
        for l in (0, 1):
            torch.testing.assert_close(last.wq[l], ref.wq[l])
            torch.testing.assert_close(last.wk[l], ref.wk[l])
        assert last.meta["doc_score"] == doc_score == ref.meta["doc_score"]  # scored as it was trained
        assert last.meta["from"] == "init" and last.meta["weights"].startswith("epoch 3 of ")
        assert last.meta["train_config"]["lr"] == 3e-2
        assert [h["epoch"] for h in last.meta["history"]] == [0, 1, 2, 3]
    with pytest.raises(PathNotFoundError, match="no training checkpoint"):
        last_epoch_router(str(tmp_path / "nothing"), router)
    other = Router({0: router.wq[0]}, {0: router.wk[0]}, H, G, D)  # one layer of two
    with pytest.raises(MemoryFormatError, match="pass the router training started from"):
        last_epoch_router(str(tmp_path / "late"), other)


def test_only_router_parameters_get_gradients(engine, cache):
    tr = TrainableRouter.from_router(_router(engine))
    backbone = list(engine.model.hf_model.parameters()) if hasattr(engine.model, "hf_model") else []
    s = tr.scores(cache, cache.query_indices(["question"]))
    mask = torch.zeros(s.shape[1], cache.n_docs, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = True
    routing_loss(s, mask).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.parameters())
    assert not cache.inputs.requires_grad and not cache.q_inputs.requires_grad
    assert all(p.grad is None for p in engine.model.layers.parameters())
    assert all(p.grad is None for p in backbone)


def test_infonce_multiple_positives():
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    pos = torch.tensor([[True, False, False], [False, True, True]])
    got = infonce(s, pos, tau=1.0)
    e = torch.exp(torch.tensor(1.0))
    l0 = -torch.log(e / (e + 2))
    l1 = -torch.log(e / (e + 1))  # the other positive is not a negative
    torch.testing.assert_close(got, (l0 + l1) / 2)


def test_adapter_roundtrip_bit_exact(engine, tmp_path):
    r = _router(engine, "random", seed=5)
    r.save(str(tmp_path / "r"))
    back = Router.load(str(tmp_path / "r"))
    assert back.layers == r.layers and back.fingerprint() == r.fingerprint() and back.meta == r.meta
    for l in r.layers:
        assert torch.equal(back.wq[l], r.wq[l]) and torch.equal(back.wk[l], r.wk[l])
    sd = r.to_msa4b_state_dict()
    assert set(sd) == {f"model.layers.{l}.self_attn.router_{x}_proj.0.weight" for l in LAYERS for x in "qk"}


def test_bank_keyed_by_one_router_refuses_another(tiny_model_dir, tmp_path):
    eng = _engine(tiny_model_dir, keep_inputs=True)
    a, b = _router(eng, "random", 1), _router(eng, "random", 2)
    eng.set_router(a)
    eng.add([x for _, _, x in DOCS], ids=IDS, progress=False)
    eng.save(str(tmp_path / "bank"))
    other = _engine(tiny_model_dir, keep_inputs=True)
    other.set_router(b)
    with pytest.raises(ModelMismatchError, match="key_mode"):
        other.load(str(tmp_path / "bank"))
    # the same router loads it; re-keying then switches it to another router (a b-keyed memory)
    other.set_router(a)
    other.load(str(tmp_path / "bank"))
    other.set_router(b)
    other.save(str(tmp_path / "bank-b"))
    third = _engine(tiny_model_dir)
    third.set_router(b)
    third.load(str(tmp_path / "bank-b"))
    assert third.route("Where was Alice born?", k=4).ids == other.route("Where was Alice born?", k=4).ids


def test_train_router_resumes_and_is_seeded(engine, cache, tmp_path):
    tr_q, dev = cache.query_indices(["ict"]), cache.query_indices(["question"])
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random")
    r1, h1 = train(engine, cache, tr_q, dev, config=cfg, out=str(tmp_path / "a"))
    r2, h2 = train(engine, cache, tr_q, dev, config=cfg, out=str(tmp_path / "b"))
    assert r1.fingerprint() == r2.fingerprint()
    assert os.path.isfile(tmp_path / "a" / "checkpoint.safetensors") and Router.load(str(tmp_path / "a" / "best"))
    # resume: 2 more epochs continue from the checkpoint, same result as 4 epochs in one go
    cfg4 = TrainConfig(epochs=4, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random", patience=99)
    cfg2 = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random", patience=99)
    train(engine, cache, tr_q, dev, config=cfg2, out=str(tmp_path / "c"))
    r_res, h_res = train(engine, cache, tr_q, dev, config=cfg4, out=str(tmp_path / "c"))
    r_one, h_one = train(engine, cache, tr_q, dev, config=cfg4, out=str(tmp_path / "d"))
    assert [h["epoch"] for h in h_res] == [0, 1, 2, 3, 4]
    assert abs(h_res[-1]["loss"] - h_one[-1]["loss"]) < 1e-4
    assert r_res.fingerprint() == r_one.fingerprint()
    # a checkpoint of other settings is not resumed silently
    with pytest.raises(InvalidArgumentError, match="other settings"):
        train(engine, cache, tr_q, dev, config=TrainConfig(epochs=4, lr=5e-2, progress=False), out=str(tmp_path / "c"))


class _Planted:
    """Unpickling this creates a marker file: what a planted checkpoint would do to a pickle loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_checkpoint_is_never_executed(engine, cache, tmp_path):
    """Issue 10 item 3: a `checkpoint.pt` planted in the output folder is never unpickled: training starts
    afresh; a pickle planted under the real checkpoint name is a clear error, not code."""
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"router": _Planted(str(marker))}, str(out / "checkpoint.pt"))
    tr_q, dev = cache.query_indices(["ict"]), cache.query_indices(["question"])
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    _, hist = train(engine, cache, tr_q, dev, config=cfg, out=str(out))
    assert not marker.exists()
    assert [h["epoch"] for h in hist] == [0, 1]  # a fresh start
    os.replace(out / "checkpoint.pt", out / "checkpoint.safetensors")  # the pickle under the safetensors name
    with pytest.raises(MemoryFormatError, match="checkpoint"):
        train(engine, cache, tr_q, dev, config=TrainConfig(epochs=2, batch_size=4, progress=False), out=str(out))
    assert not marker.exists()


def _poison(directory, value=float("nan")):
    """Rewrite an adapter's weights with one non-finite value (the manifest stays valid)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "router.safetensors")
    sd = load_file(path)
    name = sorted(sd)[0]
    sd[name][0, 0] = value
    save_file(sd, path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_router_is_refused(tiny_model_dir, engine, tmp_path, value):
    """Issue 10 item 9: a NaN/inf adapter would route nothing; loading it fails naming the problem."""
    d = str(tmp_path / "r")
    _router(engine, "random", seed=5).save(d)
    _poison(d, value)
    with pytest.raises(MemoryFormatError, match="NaN or inf"):
        Router.load(d)
    with pytest.raises(MemoryFormatError, match="NaN or inf"):
        MSAEngine.from_pretrained(tiny_model_dir("llama"), router=d, device="cpu", chunk_size=4)
    bad = _router(engine, "random", seed=5)
    bad.wk[LAYERS[0]][0, 0] = value
    with pytest.raises(InvalidArgumentError, match="NaN or inf"):
        bad.save(str(tmp_path / "never"))
    assert not os.path.exists(tmp_path / "never" / "router.safetensors")


def test_diverging_training_stops_without_saving(engine, cache, tmp_path):
    """Training that produces non-finite weights raises instead of writing a router or checkpoint."""
    poisoned = FeatureCache(cache.layers, cache.doc_ids, cache.doc_start, cache.chunk_doc, cache.inputs.clone())
    q = cache.query_indices(["question"])
    feats = [cache.q_inputs[:, int(cache.q_start[i]):int(cache.q_start[i + 1])].clone() for i in q]
    feats[0][0, 0, 0] = float("inf")  # one bad feature value: inf * 0-weight = NaN scores
    poisoned.add_queries([cache.q_text[i] for i in q], feats, [cache.q_pos[i] for i in q])
    out = tmp_path / "diverged"
    with pytest.raises(InvalidArgumentError, match="diverged"):
        train(engine, poisoned, [0, 1], None, config=TrainConfig(epochs=2, batch_size=2, progress=False),
              out=str(out))
    assert not (out / "checkpoint.safetensors").exists() and not (out / "best").exists()


def test_format_versions_are_clear_errors(engine, cache, tmp_path):
    d = str(tmp_path / "r")
    _router(engine).save(d)
    with open(os.path.join(d, "router.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(d, "router.json"), "w") as f:
        json.dump(dict(manifest, format_version=99), f)
    with pytest.raises(MemoryFormatError, match="format version 99"):
        Router.load(d)
    with open(os.path.join(d, "router.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(MemoryFormatError, match="router.json"):
        Router.load(d)
    with pytest.raises(PathNotFoundError, match="does not exist"):
        Router.load(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MemoryFormatError, match="not a router adapter"):
        Router.load(str(tmp_path / "empty"))
    c = str(tmp_path / "c")
    cache.save(c)
    with open(os.path.join(c, "features.json")) as f:
        meta = json.load(f)
    with open(os.path.join(c, "features.json"), "w") as f:
        json.dump(dict(meta, format_version=99), f)
    with pytest.raises(MemoryFormatError, match="format version 99"):
        FeatureCache.load(c)
    with open(os.path.join(c, "features.json"), "w") as f:
        json.dump(dict(meta, q_pos=[[99]] * len(meta["q_pos"])), f)  # positives that are no documents
    with pytest.raises(MemoryFormatError, match="positive"):
        FeatureCache.load(c)


def test_router_files_from_different_saves_are_refused(engine, tmp_path):
    """Router.save replaces router.safetensors, then router.json: a save cut off between the two leaves new
    weights beside the old manifest. Loading them as the manifest's router would route silently wrong."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _router(engine, seed=0).save(a)
    _router(engine, seed=1).save(b)
    assert Router.load(a).fingerprint() == _router(engine, seed=0).fingerprint()
    shutil.copy(os.path.join(b, "router.safetensors"), os.path.join(a, "router.safetensors"))
    with pytest.raises(MemoryFormatError, match="interrupted"):
        Router.load(a)


def _cut_off_at_rename(monkeypatch, n: int):
    """Make the n-th os.replace (1-based) of the next save raise, as a crash there would stop it."""
    import msa_plugins.engine.router as router_mod

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError("simulated crash")
        return real(src, dst)

    monkeypatch.setattr(router_mod.os, "replace", replace)


@pytest.mark.parametrize("cut", [1, 2])
def test_a_router_save_cut_off_loses_nothing(engine, tmp_path, monkeypatch, caplog, cut):
    """A save cut off before its first rename leaves the old adapter; one cut off between the two renames left
    only new weights beside the old manifest (refused at load before): its journal now finishes it."""
    d = str(tmp_path / "r")
    old, new = _router(engine, seed=0), _router(engine, seed=1)
    old.save(d)
    _cut_off_at_rename(monkeypatch, cut)
    with pytest.raises(OSError, match="simulated"):
        new.save(d)
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="msa_plugins.engine.router"):
        back = Router.load(d)
    assert back.fingerprint() == (old if cut == 1 else new).fingerprint()
    assert ("cut off" in caplog.text) == (cut == 2)
    new.save(d)  # the next save goes through and cleans up
    assert Router.load(d).fingerprint() == new.fingerprint()
    assert sorted(os.listdir(d)) == [".router.lock", "router.json", "router.safetensors"]


def test_concurrent_router_saves_leave_one_whole_adapter(engine, tmp_path):
    """Threads saving different routers into one folder take turns: the folder always loads, as one of them."""
    import threading

    d = str(tmp_path / "r")
    routers = [_router(engine, seed=s) for s in range(4)]
    errors = []

    def save(r):
        try:
            for _ in range(5):
                r.save(d)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Router.load(d).fingerprint() in {r.fingerprint() for r in routers}


def test_router_shape_errors_are_router_mismatch(engine):
    wq, wk = init_router_weights(engine.model, LAYERS, "random", 0)
    with pytest.raises(RouterMismatchError, match="W_KR for layers"):
        Router(wq, {LAYERS[0]: wk[LAYERS[0]]}, engine.model.n_heads, engine.model.n_kv_heads, engine.model.head_dim)


def test_inverse_cloze_and_metrics():
    pairs = inverse_cloze_pairs([(0, "Paris", DOCS[0][2]), (1, "", "short")], per_doc=1, titles=True, seed=0)
    assert pairs[0] == ("Paris", [0], "ict-title")
    assert pairs[1][1] == [0] and pairs[1][2] == "ict-sentence" and pairs[1][0] in DOCS[0][2]
    m = retrieval_metrics([["a", "b", "c"], ["x", "y"]], [["b"], ["z", "x"]], ks=(1, 2))
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2) and m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1.0) / 2) and m["n_questions"] == 2


def test_train_router_for_the_engines_own_documents(engine):
    result = train_router_for(engine, questions=[("Where was Alice born?", ["alice"])], ict_per_doc=1,
                              config=TrainConfig(epochs=1, batch_size=4), progress=False)
    assert result.router.layers == LAYERS and result.n_train >= len(DOCS) and result.directory is None
    assert engine.snapshot().ids == IDS


def _cli_inputs(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d, "title": t, "text": x}) for d, t, x in DOCS))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "Where was Alice born?", "doc_ids": ["alice"]}) + "\n"
                     + json.dumps({"question": "Which animal jumps?", "positives": [DOCS[2][2]]}) + "\n")
    return corpus, pairs


def test_text_files_give_their_title_line_as_a_pseudo_query_as_adapt_does(tmp_path):
    """A .txt/.md corpus file whose first line is a title (as `msa adapt` reads one: `split_title`) gives it
    as the title, so `train-router` makes a title pseudo-query from it; the document stays the file's exact
    text, and a --pairs positive quoting the whole file names it."""
    from msa_plugins.train_cli import read_corpus, read_pairs
    from msa_plugins.trainer import split_title

    files = {"titled.txt": "Lisbon\nLisbon is the capital of Portugal.",
             "plain.md": "A single paragraph with no title line at all.",
             "spaced.txt": "  Padded title \nThe first line has spaces around it."}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    docs = {os.path.basename(d): (t, x) for d, t, x in read_corpus([str(tmp_path / "*")])}
    assert docs["titled.txt"] == split_title(files["titled.txt"]) == ("Lisbon", "Lisbon is the capital of Portugal.")
    assert docs["plain.md"] == ("", files["plain.md"])
    assert docs["spaced.txt"] == ("", files["spaced.txt"])  # a stripped title would change the document's text
    corpus = read_corpus([str(tmp_path / "*")])
    pairs_file = tmp_path / "qa.jsonl"
    pairs_file.write_text(json.dumps({"question": "What is Portugal's capital?", "positives": [files["titled.txt"]]}) + "\n"
                          + json.dumps({"question": "Which title?", "positives": ["Lisbon is the capital of Portugal."]}))
    n = len(corpus)
    pairs = read_pairs(str(pairs_file), corpus)
    assert len(corpus) == n and [ids for _, ids in pairs] == [[d for d, _, _ in corpus if d.endswith("titled.txt")]] * 2


def test_cli_train_router_writes_loadable_adapter(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from msa_plugins.cli import main

    corpus, pairs = _cli_inputs(tmp_path)
    out = tmp_path / "router"
    rc = main(["--model", tiny_model_dir("llama"), "--device", "cpu", "train-router", "--corpus", str(corpus),
               "--pairs", str(pairs), "--out", str(out), "--layers", "2,3", "--chunk-size", "4", "--epochs", "2",
               "--export-msa4b", str(tmp_path / "msa4b.safetensors")])
    assert rc == 0
    # no trained router to start from: a new one, with the teachers and mined negatives
    cfg = Router.load(str(out)).meta["train_config"]
    assert (cfg["init"], cfg["epochs"], cfg["patience"], cfg["negatives"]) == ("tied-random", 2, 3, "mined")
    eng = MSAEngine.from_pretrained(tiny_model_dir("llama"), router=str(out), device="cpu", chunk_size=4)
    assert eng.info()["routing_layers"] == LAYERS and eng.has_trained_router
    sd, adapter = load_file(str(tmp_path / "msa4b.safetensors")), load_file(str(out / "router.safetensors"))
    assert set(sd) == set(adapter) and all(torch.equal(sd[k], adapter[k]) for k in sd)


def test_cli_never_runs_a_planted_checkpoint(tiny_model_dir, tmp_path, capsys):
    """Issue 10 item 3 through `msa train-router --out DIR`: DIR/train/checkpoint.pt is never unpickled;
    a pickle under the checkpoint's own name is a one-line error (exit code 2)."""
    from msa_plugins.cli import main

    corpus, _ = _cli_inputs(tmp_path)
    marker = tmp_path / "pwned"
    out = tmp_path / "router"
    (out / "train").mkdir(parents=True)
    torch.save(_Planted(str(marker)), str(out / "train" / "checkpoint.pt"))
    args = ["--model", tiny_model_dir("llama"), "--device", "cpu", "train-router", "--corpus", str(corpus),
            "--out", str(out), "--layers", "2,3", "--chunk-size", "4", "--epochs", "1"]
    assert main(args) == 0 and not marker.exists()
    os.replace(out / "train" / "checkpoint.pt", out / "train" / "checkpoint.safetensors")
    capsys.readouterr()
    assert main(args[:-1] + ["2"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("msa: error")]
    assert len(errors) == 1 and "checkpoint" in errors[0] and "--no-resume" in errors[0]
    assert not marker.exists()


def test_cli_train_router_fine_tunes_the_models_trained_router_with_the_adaptation_setting(engine, tiny_model_dir,
                                                                                              tmp_path, capsys,
                                                                                              monkeypatch):
    """`msa train-router` by default does what `msa adapt` does, on a corpus: it starts from the trained router
    the engine would route with (here --router), on its layers, distils the teachers and mines negatives;
    its epoch 0 is that router. --layers other than the router's, and --router with a new --init, are errors."""
    from msa_plugins.cli import main

    corpus, _ = _cli_inputs(tmp_path)
    start = _router(engine, "random", seed=5)
    start.save(str(tmp_path / "start"))
    out = tmp_path / "tuned"
    common = ["--model", tiny_model_dir("llama"), "--device", "cpu", "--router", str(tmp_path / "start"),
              "train-router", "--corpus", str(corpus), "--chunk-size", "4", "--teachers", "bm25"]
    assert main(common + ["--out", str(out)]) == 0
    tuned = Router.load(str(out))
    prov = tuned.meta["provenance"]
    assert prov["init"] == start.fingerprint() and prov["teachers"] == ["bm25"]
    assert prov["method"] == "ict-infonce+distil-bm25+mined-negatives" and prov["labels"] == "none"
    cfg = tuned.meta["train_config"]
    assert (cfg["epochs"], cfg["patience"], cfg["negatives"]) == (4, 2, "mined") and tuned.layers == LAYERS
    assert cfg["init"] == start.fingerprint()  # what it started from, not the unused TrainConfig.init
    # rerun in the same folder with other settings: the features are reused, the other checkpoint is not
    # resumed (nothing to resume), and it trains afresh instead of failing after the encoding
    assert main(common[:-1] + ["none", "--negatives", "bank", "--out", str(out)]) == 0
    assert Router.load(str(out)).meta["provenance"]["method"] == "ict-infonce"
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x"), "--layers", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "--layers 1,2 differs from the layers of the router being fine-tuned (2,3)" in err
    assert main(common + ["--out", str(tmp_path / "y"), "--init", "tied-random"]) == 2
    assert "--router names the router to fine-tune" in capsys.readouterr().err
    # $MSA_ROUTER is a default, not a request: --init tied-random trains a new router and says it is not used
    monkeypatch.setenv("MSA_ROUTER", str(tmp_path / "start"))
    new = [a for a in common if a not in ("--router", str(tmp_path / "start"))]
    assert main(new + ["--out", str(tmp_path / "w"), "--init", "tied-random", "--epochs", "1"]) == 0
    assert "$MSA_ROUTER" in capsys.readouterr().err
    assert Router.load(str(tmp_path / "w")).meta["provenance"]["init"] == "tied-random"
    monkeypatch.delenv("MSA_ROUTER")
    assert main(common[:-1] + ["nope", "--out", str(tmp_path / "z")]) == 2
    assert "unknown teacher" in capsys.readouterr().err


def test_train_router_for_distils_teachers_from_a_given_router(engine, tmp_path):
    """train_router_for with teachers and init_router: epoch 0 is init_router (same dev MRR on the same
    features), it trains with the teachers' targets and records how (provenance)."""
    start = _router(engine, "random", seed=5)
    result = train_router_for(engine, DOCS, ict_per_doc=2, dev_fraction=0.25, teachers=["bm25"], init_router=start,
                              out=str(tmp_path / "r"), config=TrainConfig(epochs=1, batch_size=4, negatives="mined"),
                              progress=False)
    prov = result.router.meta["provenance"]
    assert prov["init"] == start.fingerprint() and prov["method"] == "ict-infonce+distil-bm25+mined-negatives"
    assert result.router.layers == LAYERS and result.n_dev >= 1
    feats = FeatureCache.load(str(tmp_path / "r" / "features"))
    dev_q = split_queries(feats, 0.25, 0)[1]
    assert result.history[0]["dev_mrr"] == pytest.approx(evaluate(start, feats, dev_q)["mrr"])
    # the teachers' targets reach the loss: the same run without them trains another router
    plain = train_router_for(engine, DOCS, ict_per_doc=2, dev_fraction=0.25, init_router=start,
                             out=str(tmp_path / "r"), config=TrainConfig(epochs=1, batch_size=4, negatives="mined"),
                             progress=False)
    assert plain.history[1]["loss"] != pytest.approx(result.history[1]["loss"])
    other = _router(engine, "random", seed=6)
    one_layer = Router({3: other.wq[3]}, {3: other.wk[3]}, other.n_heads, other.n_kv_heads, other.head_dim)
    with pytest.raises(InvalidArgumentError, match="routes layers"):
        train_router_for(engine, DOCS, init_router=one_layer, progress=False)


def test_engine_train_router_fine_tunes_its_own_router_only_when_it_has_one(engine, tiny_model_dir, tmp_path):
    with pytest.raises(InvalidArgumentError, match="needs a trained router"):
        engine.train_router(DOCS, fine_tune=True, progress=False)
    start = _router(engine, "random", seed=5)
    start.save(str(tmp_path / "start"))
    routed = _engine(tiny_model_dir, router=str(tmp_path / "start"))
    result = routed.train_router(DOCS, fine_tune=True, progress=False)
    assert result.router.meta["provenance"]["init"] == start.fingerprint()
    assert result.router.meta["train_config"]["negatives"] == "mined"  # adaptation's setting when config is None


def test_dev_split_holds_out_inverse_cloze_queries_when_there_are_few_questions(engine):
    """With under 10 labelled questions there is still a dev split (of inverse-cloze queries) for early
    stopping, and every question trains."""
    feats = build_features(engine, DOCS, [("Where was Alice born?", ["alice"])], ict_per_doc=2, progress=False)
    train_q, dev_q = split_queries(feats, 0.25, 0)
    assert dev_q and set(dev_q) <= set(feats.query_indices(["ict"]))
    assert set(feats.query_indices(["question"])) <= set(train_q)


def test_late_interaction_training_scores_equal_the_naive_reference(engine, cache):
    """TrainableRouter with doc_score="late" (mean over question tokens of the max over a document's chunks)
    == the plain-loop reference of `kernels.naive`, query by query and in one batch."""
    from msa_plugins.kernels import doc_scores_naive_late

    tr = TrainableRouter.from_router(_router(engine, "random", seed=5), "late")
    keys = torch.stack([tr.keys(i, cache.inputs[i].float()) for i in range(len(LAYERS))]).detach()  # [L, C, G*D]
    refs = []
    for q in range(cache.n_queries):
        a, b = int(cache.q_start[q]), int(cache.q_start[q + 1])
        q_fold = torch.stack([tr.queries(i, cache.q_inputs[i, a:b].float()) for i in range(len(LAYERS))]).detach()
        refs.append(doc_scores_naive_late(q_fold, keys, cache.chunk_doc, cache.n_docs))  # [L, N]
        torch.testing.assert_close(tr.scores(cache, [q])[:, 0].detach(), refs[-1], atol=1e-5, rtol=1e-5)
    batch = tr.scores(cache, list(range(cache.n_queries))).detach()  # [L, Q, N]
    torch.testing.assert_close(batch, torch.stack(refs, 1), atol=1e-5, rtol=1e-5)
    # and it is another score than max-max (else the option would be a no-op)
    maxmax = TrainableRouter.from_router(_router(engine, "random", seed=5)).scores(cache, list(range(cache.n_queries)))
    assert not torch.allclose(batch, maxmax.detach())


def test_late_router_routes_like_an_engine_scoring_late(tiny_model_dir, engine, cache):
    """A router trained with doc_score="late" records it; an engine configured with doc_score="late"
    ranks documents as the training scores them."""
    router, hist = train(engine, cache, cache.query_indices(), config=TrainConfig(
        epochs=1, init="random", seed=0, doc_score="late", progress=False))
    assert router.meta["doc_score"] == "late"
    tr = TrainableRouter.from_router(router)
    assert tr.doc_score == "late"
    late = _engine(tiny_model_dir, router="none", doc_score="late")
    late.set_router(router)
    late.add(TEXTS, ids=IDS, progress=False)
    _assert_routes_like_engine(tr, cache, late, cache.query_indices(["question"]))


def test_router_trained_late_warns_on_a_maxmax_engine(tiny_model_dir, engine, caplog):
    router = _router(engine, "random", seed=1)
    router.meta["doc_score"] = "late"
    with caplog.at_level("WARNING"):
        _engine(tiny_model_dir, router="none").set_router(router)
    assert "doc_score='late'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _engine(tiny_model_dir, router="none", doc_score="late").set_router(router)
    assert "doc_score" not in caplog.text


def test_hybrid_rank_on_cached_features_equals_the_engines_hybrid_routing(tiny_model_dir, engine, cache):
    """`trainer.hybrid_rank` (what the routing benchmarks report as hybrid) ranks as `retrieve(routing="hybrid")`."""
    from msa_plugins.trainer import hybrid_rank

    router = _router(engine, "random", seed=7)
    e = _engine(tiny_model_dir, router="none")
    e.set_router(router)
    e.add(TEXTS, ids=IDS, progress=False)
    qs = cache.query_indices()
    got = hybrid_rank(router, cache, qs, [cache.q_text[q] for q in qs], TEXTS, topk=3)
    want = [[d.id for d in e.retrieve(cache.q_text[q], k=3, routing="hybrid")] for q in qs]
    assert got == want
    with pytest.raises(InvalidArgumentError, match="one text per document"):
        hybrid_rank(router, cache, qs, [cache.q_text[q] for q in qs], TEXTS[:2])


def test_a_snapshot_taken_before_set_router_routes_with_the_router_that_keyed_it(tiny_model_dir, engine):
    """`route(snapshot=old)` after `set_router(new)` scores the old keys with the old router's queries (not the
    new router's queries against the old keys); a fresh snapshot routes with the new router."""
    e = _engine(tiny_model_dir, router="none", keep_inputs=True)
    e.set_router(_router(engine, "random", seed=3))
    e.add(TEXTS, ids=IDS, progress=False)
    q = "Where was Alice born?"
    old_snap, before = e.snapshot(), e.route(q, k=len(IDS))
    e.set_router(_router(engine, "random", seed=4))
    again = e.route(q, k=len(IDS), snapshot=old_snap)
    assert again.ids == before.ids and again.scores == pytest.approx(before.scores, abs=1e-6)
    assert e.route(q, k=len(IDS)).scores != pytest.approx(before.scores, abs=1e-6)


def test_a_set_router_racing_a_load_is_refused_and_changes_nothing(tiny_model_dir, engine, tmp_path, monkeypatch):
    """A `set_router` landing between a load's fingerprint check and its swap: the load is refused (the memory
    was keyed by the old router), not swapped in under the new one, and the engine's memory stays as it was."""
    from msa_plugins.engine import storage

    a, b = _router(engine, "random", seed=21), _router(engine, "random", seed=22)
    saver = _engine(tiny_model_dir, router="none", keep_inputs=True)
    saver.set_router(a)
    saver.add(TEXTS, ids=IDS, progress=False)
    saver.save(str(tmp_path / "bank"))
    e = _engine(tiny_model_dir, router="none", keep_inputs=True)
    e.set_router(a)
    e.add(["A note kept before the load."], ids=["note"], progress=False)
    read = storage.load

    def read_then_set_router(*args, **kw):  # the real read and check, then the racing writer
        stored = read(*args, **kw)
        e.set_router(b)
        return stored

    monkeypatch.setattr(storage, "load", read_then_set_router)
    with pytest.raises(ModelMismatchError, match="key_mode"):
        e.load(str(tmp_path / "bank"))
    monkeypatch.undo()
    assert e.snapshot().ids == ["note"] and e.fingerprint()["key_mode"] == b.fingerprint()
    # what the engine now holds is keyed by b: equal to a fresh b-keyed memory of the same text
    fresh = _engine(tiny_model_dir, router="none", keep_inputs=True)
    fresh.set_router(b)
    fresh.add(["A note kept before the load."], ids=["note"], progress=False)
    assert torch.allclose(e.snapshot()._state.keys_r.float(), fresh.snapshot()._state.keys_r.float(), atol=1e-5)


def test_concurrent_set_router_and_add_never_mix_routers(tiny_model_dir, engine):
    """Writers encode under the bank's lock and the engine swaps its router there too: whatever the interleaving
    of `add` and `set_router`, every routing key in the memory is the current router's key of its pooled inputs."""
    import threading

    e = _engine(tiny_model_dir, router="none", keep_inputs=True)
    routers = [_router(engine, "random", seed=s) for s in (11, 12)]
    e.set_router(routers[0])
    errors = []

    def adder():
        try:
            for i in range(12):
                e.add([f"Document number {i} talks about topic {i % 3}."], ids=[f"d{i}"], progress=False)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    def switcher():
        try:
            for i in range(12):
                e.set_router(routers[i % 2])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=adder), threading.Thread(target=switcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    state = e.snapshot()._state
    assert len(state) == 12 and state.key_mode == e.router.fingerprint()
    want = torch.stack([e.encoder.routing_keys_from_inputs(layer, state.inputs[i], e.router)
                        for i, layer in enumerate(e.routing_layers)])
    torch.testing.assert_close(state.keys_r.float(), want.float(), atol=1e-5, rtol=1e-5)
