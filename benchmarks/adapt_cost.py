"""What adapting the router to a memory costs, end to end, as a user runs it: `msa ingest --keep-inputs`
(the encoding) then `msa adapt --memory M` (no labels), each in its own process, on the same machine in
the same run.

The corpus: HotpotQA train100's passages (../shared/datasets) written as one .txt file each (title line,
then the text), taken in file order until the memory holds about --tokens tokens (default 100K, the
issue's "100K-token memory"). Reported (JSON, --out):
  - wall seconds of each process and their ratio adapt / ingest (goal < 3x), and the ingest's encoding
    rate; `msa adapt`'s own breakdown (pseudo-query features, teachers, training, re-keying) from its log;
  - peak RSS of each process (`os.wait4`'s ru_maxrss; goal < 4 GB);
  - the memory folder's bytes before and after adaptation, and the extra bytes adaptation left (goal: no
    more than the memory's own size), file by file.
The CPU may be shared: the load average is recorded beside each step and threads are pinned (--threads).

    python -m benchmarks.adapt_cost [--tokens 100000] [--threads 2] [--work runs/adapt_cost] [--doc2query]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "adapt_cost.json")


def folder_bytes(path: str) -> dict:
    """relative path -> bytes of every file under `path`."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, path)] = os.path.getsize(p)
    return out


def run_measured(cmd: list, env: dict, log_path: str) -> dict:
    """Run `cmd` to completion -> wall seconds, peak RSS (GB) of that process, its exit code; output to log."""
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "max_rss_gb": round(usage.ru_maxrss / 2 ** 20, 3),
            "rc": rc, "load_avg_start": load0, "load_avg_end": os.getloadavg()}


def write_corpus(folder: str, max_tokens: int, data_root=None) -> dict:
    """HotpotQA train100's passages as .txt files (title line + text), in file order, up to max_tokens."""
    from transformers import AutoTokenizer

    from msa_plugins.integrations.ragas.datasets import load_hotpotqa_train100
    from msa_plugins.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None)[0])
    es = load_hotpotqa_train100(data_root)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    n_tok = 0
    n = 0
    for d in es.documents:
        text = d.memory_text()
        n_tok += len(tok(text, add_special_tokens=False)["input_ids"])
        n += 1
        with open(os.path.join(folder, f"{n:05d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        if n_tok >= max_tokens:
            break
    return {"source": "hotpotqa_train100 passages, file order", "documents": n, "tokens": n_tok}


def adapt_breakdown(log_path: str) -> dict:
    """`msa adapt`'s report line -> its own timings: total, pseudo-query features, teachers, training, re-keying."""
    text = open(log_path, encoding="utf-8", errors="replace").read()
    out = {}
    for key, pattern in (("total", r"\) in ([0-9.]+) s"), ("query_features", r"pseudo-query features ([0-9.]+) s"),
                         ("doc2query", r"doc2query ([0-9.]+) s"),
                         ("teachers", r"teachers ([0-9.]+) s"), ("train", r"training ([0-9.]+) s"),
                         ("rekey", r"re-keying ([0-9.]+) s")):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "adapt_cost"))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--doc2query", action="store_true", help="adapt with `msa adapt --doc2query` (the model writes "
                    "one question per document to train on)")
    args = ap.parse_args(argv)
    corpus, memory = os.path.join(args.work, "corpus"), os.path.join(args.work, "memory")
    shutil.rmtree(memory, ignore_errors=True)
    data = write_corpus(corpus, args.tokens, args.data_root)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    msa = [sys.executable, "-m", "msa_plugins.cli"]
    ingest = run_measured(msa + ["--device", "cpu", "ingest", corpus, "--memory", memory, "--keep-inputs",
                                 "--relative-to", corpus], env, os.path.join(args.work, "ingest.log"))
    before = folder_bytes(memory)
    adapt = run_measured(msa + ["--device", "cpu", "adapt", "--memory", memory] + (["--doc2query"] if args.doc2query
                                                                                  else []), env,
                         os.path.join(args.work, "adapt.log"))
    after = folder_bytes(memory)
    adapt["breakdown_s"] = adapt_breakdown(os.path.join(args.work, "adapt.log"))
    mem_bytes = sum(before.values())
    extra = {p: b - before.get(p, 0) for p, b in after.items() if b != before.get(p, 0)}
    extra.update({p: -b for p, b in before.items() if p not in after})
    extra_bytes = sum(after.values()) - mem_bytes
    report = {
        "corpus": data, "threads": args.threads, "doc2query": args.doc2query, "ingest": ingest, "adapt": adapt,
        "adapt_over_ingest": round(adapt["wall_s"] / ingest["wall_s"], 3),
        "encode_tokens_per_s": round(data["tokens"] / ingest["wall_s"], 1),
        "memory_bytes_before": mem_bytes, "memory_bytes_after": sum(after.values()),
        "extra_bytes": extra_bytes, "extra_over_memory": round(extra_bytes / max(mem_bytes, 1), 3),
        "changed_files": dict(sorted(extra.items(), key=lambda x: -abs(x[1]))[:20]),
        "goals": {"adapt_over_ingest < 3": adapt["wall_s"] < 3 * ingest["wall_s"],
                  "peak RSS < 4 GB": max(ingest["max_rss_gb"], adapt["max_rss_gb"]) < 4.0,
                  "extra files <= memory size": extra_bytes <= mem_bytes},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "command": "python -m benchmarks.adapt_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("corpus", "adapt_over_ingest", "extra_over_memory", "goals")}, indent=1))
    print(f"ingest {ingest['wall_s']} s ({ingest['max_rss_gb']} GB), adapt {adapt['wall_s']} s "
          f"({adapt['max_rss_gb']} GB) {adapt['breakdown_s']}; memory {mem_bytes / 1e6:.1f} MB, "
          f"extra {extra_bytes / 1e6:.1f} MB; written to {args.out}")
    return 0 if ingest["rc"] == 0 and adapt["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
