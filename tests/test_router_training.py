"""Router training on cached features (issue 4), on tiny random models: mechanics, not quality."""

import json
import os

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine.memory import ModelMismatchError
from msa_plugins.engine.router import Router
from msa_plugins.engine.training import (FeatureCache, TrainConfig, TrainableRouter, build_cache, evaluate,
                                         infonce, init_router_weights, inverse_cloze_pairs, question_inputs,
                                         retrieval_metrics, routing_loss, train_router)

LAYERS = [2, 3]
DOCS = [
    ("paris", "Paris", "Paris is the capital of France. It lies on the Seine and has many museums."),
    ("alice", "Alice", "Alice was born in 1990 in Lisbon. She works as a painter in the old town."),
    ("fox", "Fox", "The quick brown fox jumps over the lazy dog. The dog sleeps all day long."),
    ("msa", "Memory", "Memory sparse attention routes each question to a few documents of the bank."),
]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", keep_inputs=True,
                                     routing_layers=LAYERS, chunk_size=4)


@pytest.fixture(scope="module")
def cache(engine):
    qs = [("What is the capital of France?", ["paris"]), ("Where was Alice born?", ["alice"])]
    return build_cache(engine, DOCS, qs, ict_per_doc=1, ict_titles=True, seed=0, progress=False)


def _router(engine, init="tied-random", seed=0):
    m = engine.model
    wq, wk = init_router_weights(m, LAYERS, init, seed)
    return Router(wq, wk, m.n_heads, m.n_kv_heads, m.head_dim, meta={"t": 1})


def test_question_inputs_equal_question_states(engine):
    from msa_plugins.engine.generation import build_prompt

    qs = ["What is the capital of France?", "Where was Alice born?", "fox"]
    batched = question_inputs(engine, qs, batch_size=2, progress=False)
    for q, got in zip(qs, batched):
        p = build_prompt(engine.model, q, system=engine.config.system_prompt)
        h, _ = engine.encoder.question_states(p.ids, p.question_mask)
        assert got.shape == h.shape
        torch.testing.assert_close(got, h.float(), atol=1e-5, rtol=1e-5)


def test_cache_matches_bank_and_roundtrips(engine, cache, tmp_path):
    s = engine.memory.state
    assert cache.doc_ids == [d for d, _, _ in DOCS]
    assert torch.equal(cache.inputs, s.inputs.float())
    assert cache.query_indices(["question"]) == [0, 1]
    assert cache.q_pos[0] == [0] and cache.q_pos[1] == [1]
    assert len(cache.query_indices(["ict"])) >= len(DOCS)
    cache.save(str(tmp_path / "c"), dtype=torch.float32)
    back = FeatureCache.load(str(tmp_path / "c"))
    assert torch.equal(back.inputs, cache.inputs) and torch.equal(back.q_inputs, cache.q_inputs)
    assert back.q_pos == cache.q_pos and back.q_kind == cache.q_kind and torch.equal(back.q_start, cache.q_start)


def test_rekey_from_cache_equals_reencoding(tiny_model_dir, engine, cache):
    """Keys from cached pooled inputs (training path, set_router re-key) == encoding with the router."""
    router = _router(engine, "random", seed=3)
    tr = TrainableRouter.from_router(router)
    fresh = MSAEngine.from_pretrained(tiny_model_dir("llama"), router=None, device="cpu", keep_inputs=True,
                                      routing_layers=LAYERS, chunk_size=4)
    fresh.set_router(router)  # empty bank: the router is used while encoding
    fresh.add([f"{t}\n{x}" for _, t, x in DOCS], ids=[d for d, _, _ in DOCS], progress=False)
    encoded = fresh.memory.state.keys_r.float()
    from_cache = torch.stack([tr.keys(i, cache.inputs[i]) for i in range(len(LAYERS))]).detach()
    torch.testing.assert_close(from_cache, encoded, atol=1e-5, rtol=1e-5)
    # and re-keying a bank encoded with the training-free router gives the same keys
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", keep_inputs=True,
                                      routing_layers=LAYERS, chunk_size=4)
    other.add([f"{t}\n{x}" for _, t, x in DOCS], ids=[d for d, _, _ in DOCS], progress=False)
    other.set_router(router)
    torch.testing.assert_close(other.memory.state.keys_r.float(), encoded, atol=1e-5, rtol=1e-5)
    # cached-feature routing == the engine's own routing with that router
    q = 0
    s = tr.scores(cache, [q]).mean(0)[0]
    got = fresh.route(cache.q_text[q], k=len(DOCS))
    torch.testing.assert_close(torch.tensor(sorted(got.scores, reverse=True)),
                               s.sort(descending=True).values.detach(), atol=1e-4, rtol=1e-4)
    assert [cache.doc_ids[i] for i in s.argsort(descending=True).tolist()] == got.ids


def test_qk_init_equals_training_free_routing(engine, cache):
    """For Llama (no q/k norm) the `qk` init is exactly the engine's training-free QKRouter."""
    tr = TrainableRouter.from_router(_router(engine, "qk"))
    s = tr.scores(cache, [0]).mean(0)[0]
    qk_engine = engine  # built without a router: QKRouter
    got = qk_engine.route(cache.q_text[0], k=len(DOCS))
    torch.testing.assert_close(torch.tensor(got.scores), s.sort(descending=True).values.detach(),
                               atol=1e-4, rtol=1e-4)


def test_loss_falls_on_separable_toy_set():
    torch.manual_seed(0)
    L, N, hid, H, G, D = 2, 6, 16, 2, 1, 8
    centers = torch.randn(N, hid)
    inputs = centers[None].expand(L, N, hid) + 0.05 * torch.randn(L, N, hid)
    cache = FeatureCache([0, 1], [f"d{i}" for i in range(N)], torch.arange(N + 1), torch.arange(N), inputs.clone())
    qin = [(centers[i] + 0.3 * torch.randn(hid))[None, None].expand(L, 2, hid).clone() for i in range(N) for _ in range(3)]
    cache.add_queries([f"q{i}" for i in range(len(qin))], qin, [[i // 3] for i in range(len(qin))])
    gen = torch.Generator().manual_seed(1)
    wq = {l: torch.randn(H * D, hid, generator=gen) for l in (0, 1)}
    wk = {l: torch.randn(G * D, hid, generator=gen) for l in (0, 1)}
    router = Router(wq, wk, H, G, D)
    cfg = TrainConfig(epochs=15, batch_size=6, lr=3e-2, seed=0, progress=False, patience=100)
    trained, hist = train_router(cache, list(range(cache.n_queries)), None, init_router=router, config=cfg,
                                 log=lambda *_: None)
    losses = [h["loss"] for h in hist]
    assert losses[-1] < 0.5 * losses[0]
    assert evaluate(trained, cache, list(range(cache.n_queries)))["recall@1"] == 1.0


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
    eng = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", keep_inputs=True,
                                    routing_layers=LAYERS, chunk_size=4)
    m = eng.model
    a = Router(*init_router_weights(m, LAYERS, "random", 1), m.n_heads, m.n_kv_heads, m.head_dim)
    b = Router(*init_router_weights(m, LAYERS, "random", 2), m.n_heads, m.n_kv_heads, m.head_dim)
    eng.set_router(a)
    eng.add([x for _, _, x in DOCS], ids=[d for d, _, _ in DOCS], progress=False)
    eng.save(str(tmp_path / "bank"))
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", keep_inputs=True,
                                      routing_layers=LAYERS, chunk_size=4)
    other.set_router(b)
    with pytest.raises(ModelMismatchError, match="key_mode"):
        other.load(str(tmp_path / "bank"))
    # the same router loads it; re-keying then switches it to another router
    other.set_router(a)
    other.load(str(tmp_path / "bank"))
    other.set_router(b)
    assert other.memory.fingerprint["key_mode"] == b.fingerprint()


def test_train_router_resumes_and_is_seeded(engine, cache, tmp_path):
    train = cache.query_indices(["ict"])
    dev = cache.query_indices(["question"])
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random")
    r1, h1 = train_router(cache, train, dev, model=engine.model, config=cfg, out_dir=str(tmp_path / "a"),
                          log=lambda *_: None)
    r2, h2 = train_router(cache, train, dev, model=engine.model, config=cfg, out_dir=str(tmp_path / "b"),
                          log=lambda *_: None)
    assert r1.fingerprint() == r2.fingerprint()
    assert os.path.isfile(tmp_path / "a" / "checkpoint.pt") and Router.load(str(tmp_path / "a" / "best"))
    # resume: 2 more epochs continue from the checkpoint, same result as 4 epochs in one go
    cfg4 = TrainConfig(epochs=4, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random", patience=99)
    cfg2 = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=0, progress=False, init="tied-random", patience=99)
    train_router(cache, train, dev, model=engine.model, config=cfg2, out_dir=str(tmp_path / "c"), log=lambda *_: None)
    r_res, h_res = train_router(cache, train, dev, model=engine.model, config=cfg4, out_dir=str(tmp_path / "c"),
                                log=lambda *_: None)
    r_one, h_one = train_router(cache, train, dev, model=engine.model, config=cfg4, out_dir=str(tmp_path / "d"),
                                log=lambda *_: None)
    assert [h["epoch"] for h in h_res] == [0, 1, 2, 3, 4]
    assert abs(h_res[-1]["loss"] - h_one[-1]["loss"]) < 1e-4


def test_inverse_cloze_and_metrics():
    pairs = inverse_cloze_pairs([(0, "Paris", DOCS[0][2]), (1, "", "short")], per_doc=1, titles=True, seed=0)
    assert pairs[0] == ("Paris", [0], "ict-title")
    assert pairs[1][1] == [0] and pairs[1][2] == "ict-sentence" and pairs[1][0] in DOCS[0][2]
    m = retrieval_metrics([["a", "b", "c"], ["x", "y"]], [["b"], ["z", "x"]], ks=(1, 2))
    assert m["recall@1"] == pytest.approx((0 + 0.5) / 2) and m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    assert m["mrr"] == pytest.approx((0.5 + 1.0) / 2)


def test_cli_train_router_writes_loadable_adapter(tiny_model_dir, tmp_path):
    from msa_plugins.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": d, "title": t, "text": x}) for d, t, x in DOCS))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"question": "Where was Alice born?", "doc_ids": ["alice"]}) + "\n"
                     + json.dumps({"question": "Which animal jumps?", "positives": [DOCS[2][2]]}) + "\n")
    out = tmp_path / "router"
    rc = main(["--model", tiny_model_dir("llama"), "--device", "cpu", "train-router", "--corpus", str(corpus),
               "--pairs", str(pairs), "--out", str(out), "--layers", "2,3", "--chunk-size", "4", "--epochs", "2",
               "--export-msa4b", str(tmp_path / "msa4b.safetensors")])
    assert rc == 0
    eng = MSAEngine.from_pretrained(tiny_model_dir("llama"), router=str(out), device="cpu", chunk_size=4)
    assert eng.routing_layers == LAYERS and eng.router.kind == "router"
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "msa4b.safetensors"))
    assert torch.equal(sd["model.layers.2.self_attn.router_q_proj.0.weight"], eng.router.wq[2].cpu())
