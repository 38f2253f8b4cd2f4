"""Train the router adapter shipped for the embedded default model (SmolLM2-135M-Instruct).

Training material (training splits only):
  - PopQA (HippoRAG 2 split, ../shared/datasets/hipporag_popqa, MIT packaging): the bank is every passage
    of the file (1,475); the 1,000 questions are split by a seeded shuffle into train / dev / test
    (50 / 10 / 40 %). The router trains on the TRAIN questions, early-stops on DEV; TEST is held out for
    benchmarks/router_eval.py.
  - unsupervised inverse-cloze pairs from the PopQA passages (title + 2 sentences per passage as queries,
    the passage as positive). No question text of the test split is ever seen.
  - never MuSiQue / HotpotQA train100 (our evaluation sets).

Full run (what produced msa_plugins/routers/smollm2-135m; ran on a GPU: encoding 326K tokens on a loaded
2-core CPU takes 30-80 minutes, the same command works there):
    python benchmarks/train_default_router.py --device cuda
A small CPU run is the same command with smaller numbers, e.g.
    python benchmarks/train_default_router.py --max-questions 150 --epochs 4 --out runs/router-small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "msa_plugins", "routers", "smollm2-135m")
DEFAULT_LAYERS = [15, 18, 21, 24, 27]


def load_dataset(name: str, data_root=None, max_questions=None, seed=0):
    from msa_plugins.integrations.ragas import datasets as ds

    loader = {"popqa": ds.load_popqa, "musique": ds.load_musique_train100,
              "hotpotqa": ds.load_hotpotqa_train100}[name]
    # max_questions: a seeded question subset with only their gold passages as the bank (small CPU runs)
    return loader(data_root=data_root, limit=max_questions, seed=seed if max_questions else None,
                  distractors=0 if max_questions else None)


def make_engine(device: str, layers, chunk_size: int = 64, model=None):
    from msa_plugins import MSAEngine

    # fp32 everywhere (also on a GPU): the router is used on CPU engines that encode in fp32
    engine = MSAEngine.from_pretrained(model=model, router=None, device=device, dtype=torch.float32,
                                       keep_inputs=True, routing_layers=list(layers), chunk_size=chunk_size,
                                       batch_tokens=32768 if str(device).startswith("cuda") else 4096)
    engine.encoder.store_dtype = torch.float32
    print("engine fingerprint:", json.dumps(engine.fingerprint()), flush=True)
    return engine


def get_cache(name: str, cache_dir: str, engine_factory, data_root=None, max_questions=None, seed=0,
              ict_per_doc=2, log=print):
    """Load the feature cache of a dataset from cache_dir, or build it (needs the model)."""
    from msa_plugins.engine.training import FeatureCache, build_cache

    tag = f"{name}-q{max_questions or 'all'}-ict{ict_per_doc}-s{seed}"
    path = os.path.join(cache_dir, tag)
    evalset = load_dataset(name, data_root, max_questions, seed)
    if FeatureCache.exists(path):
        cache = FeatureCache.load(path)
        log(f"{name}: loaded feature cache {path}")
    else:
        engine = engine_factory()
        t0 = time.perf_counter()
        docs = [(d.id, d.title, d.text) for d in evalset.documents]
        qs = [(q.question, q.gold_doc_ids) for q in evalset.questions]
        cache = build_cache(engine, docs, qs, ict_per_doc=ict_per_doc, ict_titles=True, seed=seed)
        cache.meta.update({"dataset": name, "max_questions": max_questions, "build_s": time.perf_counter() - t0})
        cache.save(path)
        log(f"{name}: built feature cache {path} in {time.perf_counter() - t0:.0f} s "
            f"({cache.n_docs} docs, {cache.meta['n_tokens']} tokens, {cache.n_queries} queries)")
    return cache, evalset


def _score(h):  # dev MRR, or minus the training loss when there is no dev split (tiny runs)
    if "dev_mrr" in h:
        return h["dev_mrr"]
    return -h["loss"] if h.get("loss") is not None else float("-inf")


def main(argv=None):
    from msa_plugins.engine.training import TrainConfig, evaluate, split_indices, train_router, INITS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="datasets folder (default ../shared/datasets or $MSA_DATASETS)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", default=",".join(map(str, DEFAULT_LAYERS)))
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--max-questions", type=int, default=None, help="PopQA question subset (bank = their passages)")
    ap.add_argument("--ict-per-doc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", default="auto", help=f"one of {INITS}, or 'auto': short run of each, keep the best")
    ap.add_argument("--init-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "router_train"))
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "router_training.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    layers = [int(x) for x in args.layers.split(",")]
    engine_box = {}

    def engine_factory():
        if "e" not in engine_box:
            engine_box["e"] = make_engine(args.device, layers, args.chunk_size)
        return engine_box["e"]

    cache, evalset = get_cache("popqa", args.cache_dir, engine_factory, args.data_root, args.max_questions,
                               args.seed, args.ict_per_doc)
    cache.to(args.device)
    qidx = cache.query_indices(["question"])
    tr_i, dev_i, te_i = split_indices(len(qidx), seed=args.seed)
    train_q = [qidx[i] for i in tr_i]
    dev_q = [qidx[i] for i in dev_i]
    ict = cache.query_indices(["ict"])
    train = train_q + ict
    # the model is needed for shapes and the qk init; load it (cheap) when the cache came from disk
    model = engine_factory().model
    report = {"command": "python benchmarks/train_default_router.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "bank": {"dataset": "popqa", "documents": cache.n_docs, "tokens": cache.meta.get("n_tokens"),
                       "layers": layers, "chunk_size": args.chunk_size},
              "data": {"train_questions": len(train_q), "dev_questions": len(dev_q), "test_questions": len(te_i),
                       "inverse_cloze_queries": len(ict), "seed": args.seed}, "inits": {}}
    init = args.init
    if init == "auto":  # measure every initialisation with a short run, keep the best by dev MRR
        for name in INITS:
            cfg = TrainConfig(epochs=args.init_epochs, batch_size=args.batch_size, lr=args.lr, init=name,
                              seed=args.seed, device=args.device, patience=99)
            _, hist = train_router(cache, train, dev_q, model=model, config=cfg, out_dir=None)
            report["inits"][name] = hist
            print(f"init {name}: dev MRR {_score(hist[0]):.3f} -> {max(_score(h) for h in hist):.3f}")
        init = max(INITS, key=lambda n: max(_score(h) for h in report["inits"][n]))
        print(f"chosen init: {init}")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, init=init, seed=args.seed,
                      device=args.device)
    meta = {"model": "SmolLM2-135M-Instruct", "trained_on": "PopQA (HippoRAG 2 split) train questions "
            f"(seeded split, seed {args.seed}) + inverse-cloze pairs from the PopQA passages",
            "licences": "PopQA file: MIT (HippoRAG fork packaging); upstream PopQA licence not verified",
            "chunk_size": args.chunk_size, "score": "cosine", "command": report["command"]}
    t0 = time.perf_counter()
    router, hist = train_router(cache, train, dev_q, model=model, config=cfg, out_dir=args.work_dir,
                                meta=meta)
    report["train_s"] = time.perf_counter() - t0
    report["init"] = init
    report["history"] = hist
    report["dev"] = evaluate(router, cache, dev_q) if dev_q else None
    router.save(args.out)
    report["router_dir"] = os.path.relpath(args.out, ROOT)
    report["router_bytes"] = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("init", "dev", "router_dir", "router_bytes", "train_s")}, indent=1))


if __name__ == "__main__":
    main()
