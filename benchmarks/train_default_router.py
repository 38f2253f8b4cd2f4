"""Train a router adapter for the embedded default model (SmolLM2-135M-Instruct) on PopQA.

Training material (training splits only):
  - PopQA (HippoRAG 2 split, ../shared/datasets/hipporag_popqa, MIT packaging): the bank is every passage
    of the file (1,475); the 1,000 questions are split by a seeded shuffle into train / dev / test
    (50 / 10 / 40 %). The router trains on the TRAIN questions, early-stops on DEV; TEST is held out for
    benchmarks/router_eval.py.
  - unsupervised inverse-cloze pairs from the PopQA passages (title + 2 sentences per passage as queries,
    the passage as positive). No question text of the test split is ever seen.
  - never MuSiQue / HotpotQA train100 (our evaluation sets), except with --extra-corpora, which trains on one
    to measure the recipe on the other (leave one corpus out); such a router is never shipped.
  - with --d2q: the questions the model itself wrote from the PopQA passages (benchmarks/doc2query.py).

The router is written to --out (default runs/router-smollm2-135m), never into the package by default.
The router shipped in msa_plugins/routers/smollm2-135m (v5) is v4 fine-tuned with the model's own doc2query
questions of the PopQA passages beside v4's data (a tenth of them held out for early stopping):
    python -m benchmarks.doc2query --corpus popqa
    python benchmarks/train_default_router.py --init-router msa_plugins/routers/smollm2-135m-v4 --epochs 3 \
        --teachers minilm,bm25 --negatives mined --positives first --d2q --chunk-size 16 \
        --cache-dir runs/router_cache-p16 --eval-corpora hotpotqa,musique --out runs/router-v5 --results runs/router-v5.json
v4 (kept as routers/smollm2-135m-v4) is v3 fine-tuned with each question's subject page as its only positive
(PopQA's second gold passage, the answer entity's page, teaches an answer-type prior):
    python benchmarks/train_default_router.py --init-router msa_plugins/routers/smollm2-135m-v3 --epochs 4 \
        --teachers minilm,bm25 --negatives mined --eval-corpora hotpotqa,musique --chunk-size 16 \
        --cache-dir runs/router_cache-p16 --out runs/router-v4 --results runs/router-v4.json --positives first
v3 (kept as routers/smollm2-135m-v3) is v2 fine-tuned on 16-token routing keys:
    python benchmarks/train_default_router.py --init-router msa_plugins/routers/smollm2-135m-v2 --epochs 4 \
        --teachers minilm,bm25 --negatives mined --eval-corpora hotpotqa,musique --chunk-size 16 \
        --cache-dir runs/router_cache-p16 --out runs/router-v3 --results runs/router-v3.json
v2 (kept as routers/smollm2-135m-v2) was made on the CPU from the cached PopQA features with distillation from
MiniLM and BM25:
    python benchmarks/train_default_router.py --init tied-random --epochs 12 --teachers minilm,bm25 \
        --negatives mined --eval-corpora hotpotqa,musique --out runs/router-v2 --results runs/router-v2.json
The first one (v1, kept as routers/smollm2-135m-v1 so that memories keyed by it still load) on a GPU:
    python benchmarks/train_default_router.py --device cuda --epochs 30
(docs/results/router_training.md is the record of all five.) A small CPU run is the same command with smaller numbers:
    python benchmarks/train_default_router.py --max-questions 150 --epochs 4 --out runs/router-small
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from importlib import resources

import torch

from msa_plugins import MSAEngine
from msa_plugins.trainer import INITS, TrainConfig, evaluate, load_or_build_features, split_indices, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_ROUTER = str(resources.files("msa_plugins") / "routers" / "smollm2-135m")  # package data (read only)
DEFAULT_OUT = os.path.join(ROOT, "runs", "router-smollm2-135m")
DEFAULT_LAYERS = [15, 18, 21, 24, 27]


def load_dataset(name: str, data_root=None, max_questions=None, seed=0):
    from msa_plugins.integrations.ragas import datasets as ds

    loader = {"popqa": ds.load_popqa, "musique": ds.load_musique_train100,
              "hotpotqa": ds.load_hotpotqa_train100, "narrativeqa": ds.load_narrativeqa}[name]
    # max_questions: a seeded question subset with only their gold passages as the bank (small CPU runs)
    return loader(data_root=data_root, limit=max_questions, seed=seed if max_questions else None,
                  distractors=0 if max_questions else None)


def make_engine(device: str, layers, chunk_size: int = 64, model=None):
    """The engine whose model the router is trained for; fp32 weights everywhere (also on a GPU): the router
    is used on CPU engines that encode in fp32 (the features are fp32 whatever the device)."""
    # router features are routing chunks: chunk_size here is P_R too (the feature caches are keyed by it)
    engine = MSAEngine.from_pretrained(model=model, router="none", device=device, dtype=torch.float32,
                                       routing_layers=list(layers), chunk_size=chunk_size, routing_chunk_size=chunk_size,
                                       batch_tokens=32768 if str(device).startswith("cuda") else 4096)
    print("engine fingerprint:", json.dumps(engine.fingerprint()), flush=True)
    return engine


def get_cache(name: str, cache_dir: str, engine, data_root=None, max_questions=None, seed=0, ict_per_doc=2,
              log=print):
    """The feature cache of a dataset: loaded from cache_dir when it was built from the same model, settings
    and data, else built (encodes the bank) and saved there. -> (FeatureCache, EvalSet).
    engine: an MSAEngine, or a function making one (router_eval.py passes a lazy factory)."""
    engine = engine if isinstance(engine, MSAEngine) else engine()
    tag = f"{name}-q{max_questions or 'all'}-ict{ict_per_doc}-s{seed}"
    path = os.path.join(cache_dir, tag)
    evalset = load_dataset(name, data_root, max_questions, seed)
    docs = [(d.id, d.title, d.text) for d in evalset.documents]
    qs = [(q.question, q.gold_doc_ids) for q in evalset.questions]
    t0 = time.perf_counter()
    cache = load_or_build_features(engine, path, docs, qs, ict_per_doc=ict_per_doc, ict_titles=True, seed=seed)
    log(f"{name}: feature cache {path} ready in {time.perf_counter() - t0:.0f} s "
        f"({cache.n_docs} docs, {cache.meta.get('n_tokens')} tokens, {cache.n_queries} queries)")
    return cache, evalset


def _hold_out(queries: list, share: float, seed: int) -> tuple:
    """A seeded `share` of `queries` for dev -> (dev, train), each sorted. (Not `trainer.split_queries`, whose
    rounding and shuffle differ: this is the split v5 was trained with.)"""
    order = random.Random(seed).sample(queries, len(queries))
    n_dev = round(share * len(queries))
    return sorted(order[:n_dev]), sorted(order[n_dev:])


def _score(h):  # dev MRR, or minus the training loss when there is no dev split (tiny runs)
    if "dev_mrr" in h:
        return h["dev_mrr"]
    return -h["loss"] if h.get("loss") is not None else float("-inf")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None, help="datasets folder (default ../shared/datasets or $MSA_DATASETS)")
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2-135M)")
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
    ap.add_argument("--init-router", default=None, help="fine-tune this router folder (e.g. the shipped one, "
                    "for other routing-key settings) instead of a fresh --init")
    ap.add_argument("--seed", type=int, default=0, help="the data: PopQA's train / dev / test split, the inverse-cloze "
                    "pairs, the dev shares (another seed puts other test questions in training)")
    ap.add_argument("--train-seed", type=int, default=None, help="the training alone: initialisation, batch order, "
                    "sampled negatives (default --seed); the spread of a recipe over training seeds, on the same data")
    ap.add_argument("--teachers", default="", help="distil from these teacher retrievers on every training query "
                    "(comma list of minilm,bm25; default none: InfoNCE only, how the first shipped router was made)")
    ap.add_argument("--negatives", default="bank", help="'bank' (every other passage) or 'mined' (router + teacher "
                    "hard negatives + random)")
    ap.add_argument("--positives", default="all", choices=("all", "first"),
                    help="first: a PopQA question's first gold passage only (its subject's page); its second gold "
                         "passage, the answer entity's page (e.g. 'Politician'), teaches an answer-type prior")
    ap.add_argument("--extra-corpora", default="", help="also train on these corpora (comma list of hotpotqa,musique): "
                    "their passages' inverse-cloze pairs and questions (a seeded --extra-dev share of the questions "
                    "joins the dev split), each against its own bank and distilled from the teachers. A corpus "
                    "trained on is no longer an unseen one: it cannot be in --eval-corpora")
    ap.add_argument("--d2q", action="store_true", help="also train on the model's own doc2query questions of the "
                    "PopQA passages (runs/d2q/popqa.jsonl, from `python -m benchmarks.doc2query --corpus popqa`); a "
                    "seeded --d2q-dev share of them joins the dev split (PopQA's dev questions alone are saturated "
                    "from v4 on: early stopping needs another signal)")
    ap.add_argument("--d2q-dev", type=float, default=0.1, help="share of the doc2query questions kept for dev")
    ap.add_argument("--extra-dev", type=float, default=0.2, help="share of each extra corpus's questions kept for dev")
    ap.add_argument("--eval-corpora", default="", help="after training, R@5/MRR of the router on these corpora "
                    "(comma list of hotpotqa,musique: corpora it never saw), against the shipped router")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "router_train"), help="checkpoints")
    ap.add_argument("--out", default=DEFAULT_OUT, help="router adapter folder to write")
    ap.add_argument("--results", default=os.path.join(ROOT, "runs", "router_training.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the training's per-epoch lines
    if args.threads:
        torch.set_num_threads(args.threads)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    torch.manual_seed(train_seed)
    layers = [int(x) for x in args.layers.split(",")]
    extra = [c for c in args.extra_corpora.split(",") if c]
    unseen = [c for c in args.eval_corpora.split(",") if c]
    if set(extra) & set(unseen):
        ap.error(f"--eval-corpora {sorted(set(extra) & set(unseen))} would be trained on (--extra-corpora): "
                 "a router is measured only on corpora it never saw")
    unknown = sorted(set(extra) - {"hotpotqa", "musique"})
    if unknown:
        ap.error(f"--extra-corpora {unknown}: choose from hotpotqa, musique (PopQA is the main corpus: its test "
                 "questions must stay unseen)")
    for name in ("extra_dev", "d2q_dev"):
        if not 0 <= getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    engine = make_engine(args.device, layers, args.chunk_size, args.model)
    cache, _ = get_cache("popqa", args.cache_dir, engine, args.data_root, args.max_questions, args.seed,
                         args.ict_per_doc)
    cache.to(args.device)
    qidx = cache.query_indices(["question"])
    if args.positives == "first":  # in memory only: the cache on disk keeps every gold passage
        for i in qidx:
            cache.q_pos[i] = cache.q_pos[i][:1]
    tr_i, dev_i, te_i = split_indices(len(qidx), seed=args.seed)
    train_q = [qidx[i] for i in tr_i]
    dev_q = [qidx[i] for i in dev_i]
    ict = cache.query_indices(["ict"])
    train_all = train_q + ict
    d2q_report = None
    if args.d2q:  # pseudo-questions the model wrote from the PopQA passages (training data: no test question)
        if ROOT not in sys.path:  # run as a file (python benchmarks/train_default_router.py): the repo is not on it
            sys.path.insert(0, ROOT)
        from benchmarks.routing_levers import add_d2q_queries

        d2q = add_d2q_queries(cache, "popqa", engine)
        d2q_dev, d2q_train = _hold_out(d2q, args.d2q_dev, args.seed)
        dev_q, train_all = dev_q + d2q_dev, train_all + d2q_train
        d2q_report = {"train": len(d2q_train), "dev": len(d2q_dev)}
    # extra corpora: cache i + 1 of the training; their (cache, query) pairs
    caches, extra_train, extra_dev, extra_report, extra_sets = [cache], [], [], {}, []
    for ci, name in enumerate(extra, start=1):
        c, ev = get_cache(name, args.cache_dir, engine, args.data_root, None, args.seed, args.ict_per_doc)
        extra_sets.append(ev)
        c.to(args.device)
        q = c.query_indices(["question"])
        dev_c, train_c = _hold_out(q, args.extra_dev, args.seed)
        n_dev = len(dev_c)
        train_c = train_c + c.query_indices(["ict"])
        caches.append(c)
        extra_train.append(train_c)
        extra_dev += [(ci, i) for i in dev_c]
        extra_report[name] = {"documents": c.n_docs, "train_questions": len(q) - n_dev, "dev_questions": n_dev,
                              "inverse_cloze_queries": len(train_c) - (len(q) - n_dev)}
    command = "python benchmarks/train_default_router.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"command": command,
              "bank": {"dataset": "popqa", "documents": cache.n_docs, "tokens": cache.meta.get("n_tokens"),
                       "layers": layers, "chunk_size": args.chunk_size},
              "data": {"train_questions": len(train_q), "dev_questions": len(dev_i), "test_questions": len(te_i),
                       "inverse_cloze_queries": len(ict), "seed": args.seed, "train_seed": train_seed,
                       "extra_corpora": extra_report,
                       "doc2query_questions": d2q_report},
              "inits": {}}
    init = args.init
    init_router = None
    if args.init_router:  # fine-tune an existing router: no init search
        from msa_plugins.trainer import Router

        init_router, init = Router.load(args.init_router), f"router {args.init_router}"
        if sorted(init_router.layers) != sorted(layers):
            ap.error(f"--init-router {args.init_router} routes layers {init_router.layers}, not --layers {layers}")
    if init == "auto":  # measure every initialisation with a short run, keep the best by dev MRR
        for name in INITS:
            cfg = TrainConfig(epochs=args.init_epochs, batch_size=args.batch_size, lr=args.lr, init=name,
                              seed=train_seed, device=args.device, patience=99)
            _, hist = train(engine, cache, train_all, dev_q, config=cfg)
            report["inits"][name] = hist
            print(f"init {name}: dev MRR {_score(hist[0]):.3f} -> {max(_score(h) for h in hist):.3f}")
        init = max(INITS, key=lambda n: max(_score(h) for h in report["inits"][n]))
        print(f"chosen init: {init}")
    teachers = [t for t in args.teachers.split(",") if t]
    targets = None
    if teachers:  # the teachers score every training query (questions and inverse-cloze) against the bank
        from msa_plugins.trainer import teacher_scorers, teacher_targets

        _, evalset = get_cache("popqa", args.cache_dir, engine, args.data_root, args.max_questions, args.seed,
                               args.ict_per_doc, log=lambda *_: None)
        t0 = time.perf_counter()
        scorers = teacher_scorers(teachers, [d.memory_text() for d in evalset.documents], cache.q_text)
        targets = teacher_targets(scorers, cache, train_all)
        if extra:  # one set of targets per cache, each over its own bank
            targets = [targets]
            for ev, c, train_c in zip(extra_sets, caches[1:], extra_train):
                targets.append(teacher_targets(teacher_scorers(teachers, [d.memory_text() for d in ev.documents],
                                                               c.q_text), c, train_c))
        report["teachers_s"] = time.perf_counter() - t0
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      init=init if init_router is None else "tied-random", seed=train_seed, device=args.device,
                      negatives=args.negatives)
    report["train_config"] = {"teachers": teachers, "negatives": args.negatives, "epochs": args.epochs,
                              "init": init, "lr": args.lr, "batch_size": args.batch_size}
    meta = {"trained_on": "PopQA (HippoRAG 2 split) train questions "
            f"(seeded split, seed {args.seed}) + inverse-cloze pairs from the PopQA passages"
            + (f"; distilled from {'+'.join(teachers)} on those queries" if teachers else "")
            + (f"; fine-tuned from the router {args.init_router}" if args.init_router else "")
            + ("; positives: each question's first gold passage (its subject's page) only"
               if args.positives == "first" else "")
            + (f"; {d2q_report['train']} doc2query questions the model wrote from the PopQA passages "
               f"({d2q_report['dev']} more for dev)" if d2q_report else "")
            + "".join(f"; {name}: inverse-cloze pairs from its passages and {r['train_questions']} of its questions "
                      f"({r['dev_questions']} more for dev)" for name, r in extra_report.items()),
            "licences": "PopQA file: MIT (HippoRAG fork packaging); upstream PopQA licence not verified",
            "command": command}
    t0 = time.perf_counter()
    if extra:  # (cache, query) pairs over every cache
        train_all = [(0, q) for q in train_all] + [(ci, q) for ci, qs in enumerate(extra_train, 1) for q in qs]
        dev_q = [(0, q) for q in dev_q] + extra_dev
    router, hist = train(engine, caches, train_all, dev_q, config=cfg, out=args.work_dir, meta=meta,
                         teacher=targets, init_router=init_router)
    report["train_s"] = time.perf_counter() - t0
    report["init"] = init
    report["history"] = hist
    scored = [h for h in hist if h.get("dev_mrr") is not None]
    # the epoch the router is from (0: the starting router); --d2q / --extra-corpora dev queries count too
    report["best_epoch"] = max(scored, key=lambda h: h["dev_mrr"])["epoch"] if scored else None
    dev_questions = [qidx[i] for i in dev_i]  # report["dev"]: PopQA's dev questions; pseudo-questions apart
    report["dev"] = evaluate(router, cache, dev_questions) if dev_questions else None
    if d2q_report and d2q_report["dev"]:
        report["dev_d2q"] = evaluate(router, cache, sorted(set(q for c, q in dev_q if c == 0) - set(dev_questions))
                                     if extra else sorted(set(dev_q) - set(dev_questions)))
    if extra:  # report["dev"] is PopQA's dev; each extra corpus's dev questions apart
        report["dev_extra"] = {name: evaluate(router, c, qs) for ci, (name, c) in enumerate(zip(extra, caches[1:]), 1)
                               if (qs := [q for cj, q in extra_dev if cj == ci])}
    router.save(args.out)
    if args.eval_corpora:  # generalisation: corpora whose passages and questions the router never saw
        from msa_plugins.trainer import Router

        report["unseen"] = {}
        shipped = Router.load(SHIPPED_ROUTER)
        for name in unseen:
            c2, _ = get_cache(name, args.cache_dir, engine, args.data_root, None, args.seed, args.ict_per_doc)
            qs = c2.query_indices(["question"])
            report["unseen"][name] = {"trained": evaluate(router, c2, qs), "shipped": evaluate(shipped, c2, qs)}
            print(name, {k: {m: round(v, 3) for m, v in r.items() if m in ("recall@5", "mrr")}
                         for k, r in report["unseen"][name].items()}, flush=True)
    report["router_dir"] = os.path.relpath(args.out, ROOT)
    report["router_bytes"] = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("init", "dev", "router_dir", "router_bytes", "train_s")}, indent=1))


if __name__ == "__main__":
    main()
