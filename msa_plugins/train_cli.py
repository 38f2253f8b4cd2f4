"""`msa train-router`: train a router adapter for any model on any corpus (issue 4).

    msa train-router --corpus docs/*.txt --out my-router                 # unsupervised (inverse cloze)
    msa train-router --corpus corpus.jsonl --pairs qa.jsonl --out my-router
    msa --model ./my-hf-model train-router --pairs qa.jsonl --out my-router --layers 16,20,24

Corpus files: .txt/.md (one document per file), .jsonl / .json (records with "text", optional "id",
"title"). Pairs JSONL: {"question": ..., "doc_ids": [...]} (ids of corpus documents) or
{"question": ..., "positives": ["document text", ...]} (added to the corpus when missing).
Writes ROUTER_DIR/router.safetensors (MSA-4B weight names) + router.json, loadable with
`MSAEngine.from_pretrained(..., router=ROUTER_DIR)`; the feature cache goes to ROUTER_DIR/features
(delete it to save space; keep it to retrain without the model) and checkpoints to ROUTER_DIR/train.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random


def read_corpus(patterns) -> list:
    """-> list of (id, title, text)."""
    docs = []
    for pattern in patterns or []:
        files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        for path in files:
            if os.path.isdir(path):
                continue
            if path.endswith((".jsonl", ".json")):
                with open(path, encoding="utf-8") as f:
                    recs = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
                for i, r in enumerate(recs):
                    if isinstance(r, str):
                        r = {"text": r}
                    docs.append((str(r.get("id", f"{os.path.relpath(path)}#{i}")), r.get("title", "") or "", r["text"]))
            else:
                with open(path, encoding="utf-8") as f:
                    docs.append((os.path.relpath(path), "", f.read()))
    seen = set()
    for d, _, _ in docs:
        if d in seen:
            raise SystemExit(f"msa: duplicate document id {d!r} in the corpus")
        seen.add(d)
    return docs


def read_pairs(path, docs) -> list:
    """-> list of (question, [doc ids]); `positives` texts missing from docs are appended to docs."""
    by_text = {x: d for d, _, x in docs}
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            ids = [str(i) for i in r.get("doc_ids", [])]
            for text in r.get("positives", []):
                if text not in by_text:
                    by_text[text] = f"pair-doc-{len(docs)}"
                    docs.append((by_text[text], "", text))
                ids.append(by_text[text])
            if not ids:
                raise SystemExit(f"msa: {path}:{n} has no doc_ids or positives")
            pairs.append((r["question"], ids))
    return pairs


def add_parser(sub) -> None:
    s = sub.add_parser("train-router", help="train a router adapter on a corpus and/or question pairs")
    s.add_argument("--corpus", nargs="*", default=[], help="corpus files or globs (.txt/.md/.jsonl/.json)")
    s.add_argument("--pairs", default=None, help="JSONL of {question, doc_ids|positives}")
    s.add_argument("--out", required=True, help="router adapter folder to write")
    s.add_argument("--layers", default=None, help="routing layers, e.g. 15,18,21,24,27 (default: upper half)")
    s.add_argument("--chunk-size", type=int, default=64)
    s.add_argument("--ict-per-doc", type=int, default=2, help="inverse-cloze sentences per document (0: none)")
    s.add_argument("--no-titles", action="store_true", help="do not use titles as inverse-cloze queries")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--tau", type=float, default=0.1)
    s.add_argument("--init", default="tied-random", help="qk, tied-random, identity or random")
    s.add_argument("--dev-fraction", type=float, default=0.1)
    s.add_argument("--patience", type=int, default=3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("--export-msa4b", default=None, help="also write one safetensors file with MSA-4B names")
    s.set_defaults(fn=cmd_train_router)


def cmd_train_router(args) -> int:
    from . import MSAEngine
    from .engine.training import FeatureCache, TrainConfig, build_cache, export_msa4b, train_router

    docs = read_corpus(args.corpus)
    pairs = read_pairs(args.pairs, docs) if args.pairs else []
    if not docs:
        raise SystemExit("msa: nothing to train on: give --corpus files and/or --pairs")
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    feat_dir = os.path.join(args.out, "features")
    if FeatureCache.exists(feat_dir) and not args.no_resume:
        cache = FeatureCache.load(feat_dir)
        engine = MSAEngine.from_pretrained(model=getattr(args, "model", None), router="none",  # features need no router
                                           device=getattr(args, "device", None), keep_inputs=True,
                                           routing_layers=cache.layers, chunk_size=args.chunk_size)
    else:
        engine = MSAEngine.from_pretrained(model=getattr(args, "model", None), router="none",  # features need no router
                                           device=getattr(args, "device", None), keep_inputs=True,
                                           routing_layers=layers, chunk_size=args.chunk_size)
        cache = build_cache(engine, docs, pairs, ict_per_doc=args.ict_per_doc, ict_titles=not args.no_titles,
                            seed=args.seed)
        cache.save(feat_dir)
    q = cache.query_indices(["question"])
    ict = cache.query_indices(["ict"])
    rng = random.Random(args.seed)
    dev_pool = list(q) if q else list(ict)  # dev: held-out questions, else held-out inverse-cloze pairs
    rng.shuffle(dev_pool)
    n_dev = int(len(dev_pool) * args.dev_fraction) if len(dev_pool) >= 10 else 0
    dev = sorted(dev_pool[:n_dev])
    train = sorted(set(q + ict) - set(dev))
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, tau=args.tau, init=args.init,
                      seed=args.seed, patience=args.patience, device=str(engine.model.device))
    meta = {"model": engine.name, "chunk_size": args.chunk_size, "score": engine.config.score,
            "corpus_documents": len(docs), "pairs": len(pairs), "inverse_cloze_queries": len(ict)}
    router, hist = train_router(cache, train, dev, model=engine.model, config=cfg,
                                out_dir=os.path.join(args.out, "train"), resume=not args.no_resume, meta=meta)
    router.save(args.out)
    if args.export_msa4b:
        export_msa4b(router, args.export_msa4b)
    last = hist[-1]
    print(f"router written to {args.out} ({len(train)} training queries, {len(dev)} dev; "
          + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("dev_")) + ")")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="msa")
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: the embedded SmolLM2-135M)")
    ap.add_argument("--device", default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
