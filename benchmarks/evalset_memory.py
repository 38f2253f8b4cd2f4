"""Save an evalset's passages as a memory that keeps its pooled layer inputs, so `msa adapt --memory` can adapt
the router to it (the memory `benchmarks.rerank_routing --memory` reads, under the evalset's document ids).

    python -m benchmarks.evalset_memory --corpus hotpotqa --out runs/mem-hotpotqa
    msa --device cpu adapt --memory runs/mem-hotpotqa
    python -m benchmarks.rerank_routing --corpus hotpotqa --memory runs/mem-hotpotqa --router runs/mem-hotpotqa/router
"""
from __future__ import annotations

import argparse
import time

from benchmarks.round_routing import LOADERS


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="hotpotqa", choices=sorted(LOADERS))
    ap.add_argument("--out", required=True, help="memory folder to write")
    ap.add_argument("--limit", type=int, default=100,
                    help="the evalset's questions, as msa eval (the loader decides the passages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from msa_plugins import MSAEngine
    from msa_plugins.integrations.ragas import datasets

    torch.set_num_threads(args.threads)
    es = getattr(datasets, LOADERS[args.corpus])(limit=args.limit, seed=args.seed)
    engine = MSAEngine.from_pretrained(device=args.device, keep_inputs=True)
    t0 = time.perf_counter()
    engine.add(es.memory_texts(), ids=es.doc_ids, progress=True)
    print(f"{args.corpus}: {len(es.doc_ids)} passages encoded in {time.perf_counter() - t0:.0f} s", flush=True)
    engine.save(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
