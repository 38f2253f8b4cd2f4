"""What each routing lever adds: unsupervised adaptation of the router to a corpus, distillation
from teacher retrievers, teacher-mined negatives; against training-free routing, the shipped router,
MiniLM and BM25, on FULL banks with questions never trained on.

One fixed setting for every corpus (no per-corpus tuning): the `AdaptConfig` defaults of
`msa_plugins.trainer` except where a row changes one lever. Adaptation trains on the corpus's own
inverse-cloze pseudo-queries only (title + 2 sentences per passage, seed 0; 10% held out for early
stopping); the evaluation questions are never seen. Features come from the feature cache of
benchmarks/train_default_router.py (`runs/router_cache/<corpus>-qall-ict2-s0`, encoded once per corpus);
this script trains exactly what `adapt_router_for` trains on them (the same `train_router`,
`teacher_targets` and teachers) and scores the questions with the engine's routing score.

    python -m benchmarks.routing_levers --corpora hotpotqa            # all levers, one corpus
    python -m benchmarks.routing_levers --corpora musique --levers ict,distil-both

Results merge into --results (JSON) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

from benchmarks.router_eval import bm25_rankings, eval_questions, minilm_rankings
from benchmarks.train_default_router import DEFAULT_LAYERS, ROOT, SHIPPED_ROUTER, get_cache, make_engine
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import (AdaptConfig, Router, hybrid_rank, query_features, rank, split_queries,
                                 teacher_scorers, teacher_targets, train, training_free_router)

# lever -> (init, teachers, negatives); init "shipped" = fine-tune the shipped router (what adapt_router_for
# does for an engine that holds it), "tied-random" = a router trained from scratch on the corpus
LEVERS = {
    "ict-scratch": ("tied-random", [], "bank"),
    "ict": ("shipped", [], "bank"),
    "distil-minilm": ("shipped", ["minilm"], "bank"),
    "distil-bm25": ("shipped", ["bm25"], "bank"),
    "distil-both": ("shipped", ["minilm", "bm25"], "bank"),
    "mined-self": ("shipped", [], "mined"),
    "distil-both+teacher-negatives": ("shipped", ["minilm", "bm25"], "mined"),
    # the default lever trained and scored with late interaction (MSAConfig.doc_score="late")
    "late-interaction": ("shipped", ["minilm", "bm25"], "mined", "late"),
    # the default lever with the corpus's doc2query questions (benchmarks/doc2query.py) added to the training
    # pseudo-queries (early stopping still on held-out inverse-cloze queries, as every other row)
    "d2q": ("shipped", ["minilm", "bm25"], "mined"),
}
D2Q_LEVERS = {"d2q"}
BASELINES = ("training-free", "shipped", "minilm", "bm25")
# hybrid systems (reported apart from pure MSA routing): the router's layer-mean ranking fused with BM25 over
# the same passage strings, by the engine's own fusion (`engine.routing.fuse`, the `MSAConfig` default "zsum")
HYBRIDS = {"hybrid-shipped": "shipped", "hybrid-adapted": "distil-both+teacher-negatives", "hybrid-d2q": "d2q"}
ORDER = ("training-free", "shipped") + tuple(LEVERS) + ("minilm", "bm25") + tuple(HYBRIDS)
# the order a run measures in: the cheap rows and the main levers first (a long run keeps what it measured)
RUN_ORDER = ("training-free", "shipped", "minilm", "bm25", "ict", "distil-both", "distil-both+teacher-negatives",
             "ict-scratch", "distil-minilm", "distil-bm25", "mined-self", "hybrid-shipped", "hybrid-adapted", "late-interaction")


_SCORERS = {}  # (corpus, teacher) -> scorer: each teacher encodes a corpus once per run


def adapt_on_cache(cache, texts, lever, seed, shipped, model_engine, epochs=None, log=print, corpus=""):
    """Train one lever's router on the cache's inverse-cloze queries -> (Router, info)."""
    init, teachers, negatives, *rest = LEVERS[lever]
    doc_score = rest[0] if rest else "maxmax"
    cfg = AdaptConfig()
    tcfg = dataclasses.replace(cfg.train, seed=seed, negatives=negatives, progress=False, doc_score=doc_score,
                               **({"epochs": epochs} if epochs else {}))
    ict = cache.query_indices(["ict"])
    # the questions are in the cache too (for scoring), but only inverse-cloze queries are trained on
    train_q, dev_q = split_queries(_ict_only(ict), cfg.dev_fraction, seed)
    train_q, dev_q = [ict[i] for i in train_q], [ict[i] for i in dev_q]
    if lever in D2Q_LEVERS:
        train_q = train_q + add_d2q_queries(cache, corpus, model_engine())
    targets, t_teach = None, 0.0
    if teachers:
        nq = cache.n_queries  # a lever that adds queries (d2q) needs the teachers to score those too
        for t in teachers:
            if (corpus, t, nq) not in _SCORERS:  # each teacher encodes the corpus and the queries once per run
                t1 = time.perf_counter()
                _SCORERS[corpus, t, nq] = teacher_scorers([t], texts, cache.q_text)[t]
                _SCORERS[corpus, t + ":s", nq] = time.perf_counter() - t1
        t1 = time.perf_counter()
        targets = teacher_targets({t: _SCORERS[corpus, t, nq] for t in teachers}, cache, train_q, k=cfg.candidates)
        # what this lever pays as adaptation does: its teachers' encoding + the candidate sets
        t_teach = time.perf_counter() - t1 + sum(_SCORERS[corpus, t + ":s", nq] for t in teachers)
    t0 = time.perf_counter()
    init_router = shipped if init == "shipped" else None
    if init != "shipped":
        tcfg = dataclasses.replace(tcfg, init=init)
    router, hist = train(model_engine(), cache, train_q, dev_q, config=tcfg, init_router=init_router,
                         teacher=targets)
    return router, {"teachers_s": t_teach, "train_s": time.perf_counter() - t0, "epochs_run": len(hist) - 1,
                    "train_queries": len(train_q), "dev_queries": len(dev_q),
                    "dev_ict_mrr": [round(h["dev_mrr"], 4) for h in hist if h.get("dev_mrr") is not None],
                    "config": {"init": init, "teachers": teachers, "negatives": negatives, "epochs": tcfg.epochs,
                               "doc_score": doc_score,
                               "patience": tcfg.patience, "distill_weight": tcfg.distill_weight,
                               "teacher_tau": tcfg.teacher_tau, "candidates": cfg.candidates}}


def add_d2q_queries(cache, corpus, engine) -> list:
    """Append the corpus's kept doc2query questions to `cache` (kind "d2q", positive: the passage each was
    generated from) and return their query indices. Idempotent: a cache that has them returns them."""
    from benchmarks.doc2query import d2q_path, load_questions

    have = cache.query_indices(["d2q"])
    if have:
        return have
    pairs = load_questions(corpus)
    if not pairs:
        raise SystemExit(f"no doc2query questions for {corpus}: run python -m benchmarks.doc2query --corpus {corpus} "
                         f"(writes {d2q_path(corpus)})")
    row = {d: i for i, d in enumerate(cache.doc_ids)}
    pairs = [(d, q) for d, q in pairs if d in row]
    t0 = time.perf_counter()
    feats = query_features(engine, [q for _, q in pairs])
    start = cache.n_queries
    cache.add_queries([q for _, q in pairs], feats, [[row[d]] for d, _ in pairs], kind="d2q")
    print(f"{corpus}: {len(pairs)} doc2query questions added ({time.perf_counter() - t0:.0f} s for their features)",
          flush=True)
    return list(range(start, cache.n_queries))


class _ict_only:
    """A view of a cache's inverse-cloze queries for `split_queries` (which prefers questions when present)."""

    def __init__(self, ict):
        self.n = len(ict)

    def query_indices(self, kinds=None):
        return [] if kinds == ["question"] else list(range(self.n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--corpora", default="hotpotqa,musique")
    ap.add_argument("--levers", default=",".join(RUN_ORDER))
    ap.add_argument("--epochs", type=int, default=None, help="override AdaptConfig's epochs (default: its own)")
    ap.add_argument("--seed", type=int, default=0, help="the data seed: feature cache (its pseudo-queries) and "
                    "evaluation questions")
    ap.add_argument("--train-seed", type=int, default=None, help="the training seed of adapted rows (default: "
                    "--seed); another value re-trains on the same data, to see the spread a seed gives")
    ap.add_argument("--max-questions", type=int, default=None, help="smoke runs only: a question subset, bank = "
                    "their gold passages (not a full bank)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shipped", default=SHIPPED_ROUTER, help="the router rows call 'shipped' (and adaptation's "
                    "starting point)")
    ap.add_argument("--tag", default="", help="suffix of every row name this run writes (e.g. '@v2' when --shipped "
                    "differs from earlier runs' shipped router)")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--chunk-size", type=int, default=64, help="P, tokens per pooled routing key (default the "
                    "paper's 64). Another P reads its features from <cache-dir>-p<P>, derived from the P=64 cache "
                    "by re-encoding the documents only (the questions' token features do not depend on P)")
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "routing_levers.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m benchmarks.routing_levers " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"corpora": {}, "commands": []}
    if os.path.isfile(args.results):
        with open(args.results) as f:
            results = json.load(f)
    if command not in results["commands"]:
        results["commands"].append(command)
    engine_box = {}

    def engine():
        if "e" not in engine_box:
            engine_box["e"] = make_engine("cpu", DEFAULT_LAYERS, chunk_size=args.chunk_size)
        return engine_box["e"]

    shipped = Router.load(args.shipped)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    # saved routers are named by the data seed, and by the training seed too when it differs
    seed_tag = f"s{args.seed}" if train_seed == args.seed else f"s{args.seed}-t{train_seed}"
    routers_dir = os.path.join(ROOT, "runs", "levers", "routers")
    for name in args.corpora.split(","):
        if args.chunk_size == 64:
            cache, evalset = get_cache(name, args.cache_dir, engine, args.data_root, args.max_questions,
                                       args.seed, 2)
        else:
            cache, evalset = derived_cache(name, args, engine)
        q_idx = eval_questions(name, evalset, args.seed)
        golds = [evalset.questions[i].gold_doc_ids for i in q_idx]
        all_q = cache.query_indices(["question"])
        cq = [all_q[i] for i in q_idx]
        texts = [d.memory_text() for d in evalset.documents]
        assert [d.id for d in evalset.documents] == cache.doc_ids
        entry = results["corpora"].setdefault(name, {"methods": {}})
        entry["bank"] = {"documents": cache.n_docs, "tokens": cache.meta.get("n_tokens"),
                         "chunks": int(cache.inputs.shape[1]), "eval_questions": len(q_idx),
                         "pseudo_queries": len(cache.query_indices(["ict"])), "layers": cache.layers}
        for lever in [x for x in args.levers.split(",") if x]:
            t0 = time.perf_counter()
            info = {}
            if lever in ("minilm", "bm25"):
                ranked = (minilm_rankings if lever == "minilm" else bm25_rankings)(evalset, q_idx)
            elif lever in HYBRIDS:
                base = HYBRIDS[lever]
                saved = os.path.join(routers_dir, f"{name}-{base}{args.tag}-{seed_tag}")
                if base == "shipped":
                    router = shipped
                elif os.path.isfile(os.path.join(saved, "router.json")):
                    router = Router.load(saved)  # the router this run (or an earlier one) adapted
                else:
                    router, info = adapt_on_cache(cache, texts, base, train_seed, shipped, engine, args.epochs,
                                                  corpus=name)
                    router.save(saved)
                info = {**info, "fusion": "zsum", "router": base}
                ranked = hybrid_rank(router, cache, cq, [evalset.questions[i].question for i in q_idx], texts)
            else:
                if lever == "training-free":
                    router = training_free_router(engine(), cache.layers)
                elif lever == "shipped":
                    router = shipped
                else:
                    router, info = adapt_on_cache(cache, texts, lever, train_seed, shipped, engine, args.epochs,
                                                  corpus=name)
                    router.save(os.path.join(routers_dir, f"{name}-{lever}{args.tag}-{seed_tag}"))  # reused by hybrid rows
                ranked = rank(router, cache, cq, topk=10)
            m = retrieval_metrics(ranked, golds)
            import resource

            entry["methods"][lever + args.tag] = {**m, **info, "train_seed": train_seed, "shipped_router": shipped.fingerprint(), "seconds": time.perf_counter() - t0,
                                       "load": os.getloadavg()[0],
                                       "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
            print(name, lever, {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}, flush=True)
            _write(results, args.results)  # after every row: a long run keeps what it measured
    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch_threads": torch.get_num_threads()}
    _write(results, args.results)


def derived_cache(name, args, engine):
    """The feature cache of `name` at chunk size args.chunk_size: the P=64 cache's queries (their token features
    do not depend on P) beside the documents re-encoded at P. Saved in <cache-dir>-p<P>/<tag>; its data hash
    is the one `get_cache` would compute for a P engine, so a later run reuses it either way."""
    from msa_plugins.trainer import FeatureCache, _data_hash, build_features, normalise_docs, _normalise_questions

    base, evalset = get_cache(name, args.cache_dir, lambda: make_engine("cpu", DEFAULT_LAYERS),
                              args.data_root, args.max_questions, args.seed, 2)
    e = engine()
    docs = normalise_docs([(d.id, d.title, d.text) for d in evalset.documents])
    qs = _normalise_questions([(q.question, q.gold_doc_ids) for q in evalset.questions])
    want = _data_hash(e, docs, qs, 2, True, args.seed)
    path = os.path.join(f"{args.cache_dir}-p{args.chunk_size}", f"{name}-q{args.max_questions or 'all'}-ict2-s{args.seed}")
    if FeatureCache.exists(path):
        cache = FeatureCache.load(path)
        if cache.meta.get("data_hash") == want:
            return cache, evalset
    t0 = time.perf_counter()
    cache = build_features(e, docs, (), ict_per_doc=0, ict_titles=False)  # the documents only
    assert cache.doc_ids == base.doc_ids
    cache.q_text, cache.q_kind, cache.q_pos = base.q_text, base.q_kind, base.q_pos
    cache.q_start, cache.q_inputs = base.q_start, base.q_inputs
    cache.meta.update({k: base.meta[k] for k in ("ict_per_doc", "ict_titles", "seed", "n_questions_given")
                       if k in base.meta})
    cache.meta.update({"data_hash": want, "derived_from_p64": base.meta.get("data_hash")})
    cache.check()
    cache.save(path)
    print(f"{name}: derived the P={args.chunk_size} cache {path} in {time.perf_counter() - t0:.0f} s "
          f"({cache.inputs.shape[1]} chunks)", flush=True)
    return cache, evalset


def _write(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    lines = []
    for name, e in results["corpora"].items():
        b = e.get("bank", {})
        # MiniLM does not depend on the router: a tagged run's own minilm row serves as well
        mini = e["methods"].get("minilm") or next((r for m, r in e["methods"].items() if m.startswith("minilm@")), None)
        lines += [f"### {name}: {b.get('documents')} passages, {b.get('tokens')} tokens, "
                  f"{b.get('eval_questions')} questions", "",
                  "| method | R@1 | R@5 | R@10 | MRR | R@5 / MiniLM | MRR / MiniLM | train s |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in list(ORDER) + sorted(x for x in e["methods"] if x not in ORDER):  # tagged rows last
            r = e["methods"].get(m)
            if not r:
                continue
            ratio = (f"{r['recall@5'] / mini['recall@5']:.2f} | {r['mrr'] / mini['mrr']:.2f}" if mini else "- | -")
            lines.append(f"| {m} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} | "
                         f"{r['mrr']:.3f} | {ratio} | {r.get('train_s', 0):.0f} |")
        lines.append("")
    with open(os.path.splitext(path)[0] + ".table.md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
