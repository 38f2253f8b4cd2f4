"""`msa eval`: the same questions through the RAG pipeline MSA replaces (A) and MSA (B).

    msa eval --dataset popqa --limit 30 --seed 0 --distractors 150                 # end to end, RAGAS metrics
    msa eval --dataset popqa --limit 100 --retrieval-only --systems rag-minilm,rag-bm25,msa,msa-training-free
    msa eval --dataset niah --niah-sizes 32768,65536 --limit 3                      # NIAH, 3 samples per size
    msa eval --dataset jsonl --docs docs.jsonl --questions qa.jsonl

Writes one folder per run (records.jsonl, summary.json, report.md with the exact command, PNG charts).
Datasets are read from --data-root, else $MSA_DATASETS, else ../shared/datasets relative to the current
directory. Encoded MSA memories are kept across runs in the bank cache (--bank-cache DIR; default
$MSA_CACHE_DIR/eval-banks, else ~/.cache/msa-plugins/eval-banks; --no-bank-cache to encode every time): a
second identical run loads them instead of encoding. --model, --router and --device may come before or
after `eval`; the device defaults to CUDA when available. Python API:
`msa_plugins.integrations.ragas.ab.run_eval`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from .integrations.ragas.ab import DATASETS, DEFAULT_SYSTEMS, PROMPT_SUFFIXES, SYSTEMS, default_bank_cache_dir


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x.strip()]


def add_parser(sub) -> None:
    s = sub.add_parser("eval", help="A/B evaluation: RAG (LlamaIndex + MiniLM / BM25) vs MSA, RAGAS metrics",
                       description="A/B evaluation: the same questions through RAG (LlamaIndex + MiniLM / BM25) "
                                   "and MSA, scored the same way (retrieval, answers, RAGAS non-LLM metrics).")
    s.add_argument("--dataset", required=True, choices=DATASETS)
    s.add_argument("--limit", type=int, default=None,
                   help="questions (NIAH: samples per memory size; default: all)")
    s.add_argument("--seed", type=int, default=0, help="seed of the question subset and distractors")
    s.add_argument("--distractors", type=int, default=None,
                   help="memory = the questions' gold documents + this many seeded others (default: full corpus)")
    s.add_argument("--retrieval-only", action="store_true", help="recall@k / MRR only, no generation (fast)")
    s.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma list of {','.join(SYSTEMS)}, each optionally with a prompt suffix "
                        f"({', '.join(PROMPT_SUFFIXES)}: MSA's interleave prompt, LlamaIndex's QA prompt, its user "
                        "turn only) over that system's documents; the first is the baseline A")
    s.add_argument("--mode", default=None, choices=["interleave", "sparse"],
                   help="MSA answer mode (default: the engine's, interleave)")
    s.add_argument("-k", "--k", type=int, default=3, help="documents per question, both systems")
    s.add_argument("--routing-chunk-size", type=int, default=None,
                   help="tokens per routing key of the MSA memories (default: the engine's, 16)")
    s.add_argument("--rounds", type=int, default=1,
                   help="MSA interleave routing rounds (multi-hop); the same k documents in all, split over "
                        "the rounds (k=5 in 2 rounds: 3 + 2), as RAG gets k")
    s.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap, both systems")
    s.add_argument("--out", default=None, help="run folder (default runs/eval-DATASET-TIME)")
    s.add_argument("--niah-sizes", default="32768", help="NIAH memory sizes in tokens, comma separated")
    s.add_argument("--niah-task", default="single", help="NIAH task (single, multikey, multivalue, multiquery, ...)")
    s.add_argument("--niah-samples", type=int, default=5, help="NIAH samples per size (when --limit is not given)")
    s.add_argument("--docs", default=None, help="--dataset jsonl: documents JSONL")
    s.add_argument("--questions", default=None, help="--dataset jsonl: questions JSONL")
    s.add_argument("--data-root", default=None,
                   help="the datasets folder (default: $MSA_DATASETS, else ../shared/datasets from the current directory)")
    s.add_argument("--no-ragas", action="store_true", help="skip RAGAS non-LLM metrics")
    s.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for LLM-judged metrics")
    s.add_argument("--judge-model", default=None, help="the judge's model name (with --judge-base-url)")
    s.add_argument("--bank-cache", default=None, metavar="DIR",
                   help="keep encoded MSA memories here across runs, keyed by model, router, build settings and "
                        f"corpus hash (default: {default_bank_cache_dir().replace('%', '%%')})")
    s.add_argument("--no-bank-cache", action="store_true", help="encode every memory, read and write no bank cache")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_eval)


def bank_cache_dir(args):
    """The bank cache folder of this run, or None with --no-bank-cache."""
    if getattr(args, "no_bank_cache", False):
        if getattr(args, "bank_cache", None):
            from .errors import InvalidArgumentError

            raise InvalidArgumentError("give --bank-cache DIR or --no-bank-cache, not both")
        return None
    return getattr(args, "bank_cache", None) or default_bank_cache_dir()


def cmd_eval(args) -> int:
    os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
    from .integrations.ragas.ab import parse_systems, run_eval

    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    parse_systems(systems)  # an unknown name fails here, before any model is loaded
    out = args.out or os.path.join("runs", f"eval-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    command = " ".join(shlex.quote(a) for a in ["msa", *getattr(args, "argv", sys.argv[1:])])
    res = run_eval(dataset=args.dataset, limit=args.limit, seed=args.seed, distractors=args.distractors,
                   retrieval_only=args.retrieval_only, systems=systems, mode=args.mode, k=args.k, rounds=args.rounds,
                   max_new_tokens=args.max_new_tokens, out_dir=out, niah_sizes=_ints(args.niah_sizes),
                   niah_samples=args.niah_samples, niah_task=args.niah_task, model=args.model, router=args.router,
                   device=args.device,  # None: the engine's default, CUDA when available (as every sub-command)
                   data_root=args.data_root, docs_path=args.docs,
                   questions_path=args.questions, judge_base_url=args.judge_base_url, judge_model=args.judge_model,
                   ragas_metrics=not args.no_ragas, command=command, progress=not args.quiet,
                   bank_cache=bank_cache_dir(args), routing_chunk_size=args.routing_chunk_size)
    with open(os.path.join(res.out_dir, "report.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {res.out_dir}")
    return 0
