"""`msa` command line: ingest files into a memory, ask it questions, inspect it, run the demo."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _engine(args):
    from . import MSAEngine

    overrides = {}
    if getattr(args, "k", None):
        overrides["k"] = args.k
    if getattr(args, "chunk_size", None):
        overrides["chunk_size"] = args.chunk_size
    if getattr(args, "keep_inputs", False):
        overrides["keep_inputs"] = True
    return MSAEngine.from_pretrained(model=args.model, router=args.router, device=args.device, **overrides)


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"msa: {path} is not UTF-8 text ({e}); convert it (e.g. `iconv -t utf-8`) and retry")
    except OSError as e:
        raise SystemExit(f"msa: cannot read {path}: {e.strerror}")


def cmd_ingest(args) -> int:
    files = []
    for pattern in args.files:
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        files += [f for f in found if os.path.isfile(f)] or ([pattern] if not os.path.exists(pattern) else [])
        if os.path.isdir(pattern):
            files += sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                            if os.path.isfile(p) and p.endswith((".txt", ".md")))
    if not files:
        raise SystemExit("msa: no files to ingest")
    texts = [read_text_file(f) for f in files]  # read everything first: a bad file adds nothing
    engine = _engine(args)
    if os.path.isfile(os.path.join(args.memory, "manifest.json")):
        engine.load(args.memory)
    ids = [os.path.relpath(f) for f in files]
    new = [(i, t) for i, t in zip(ids, texts) if i not in engine.memory]
    skipped = len(ids) - len(new)
    t0 = time.perf_counter()
    added = engine.add([t for _, t in new], ids=[i for i, _ in new],
                       metadata=[{"source": i} for i, _ in new]) if new else []
    dt = time.perf_counter() - t0
    engine.save(args.memory)
    n_tok = sum(d.n_tokens for d in engine.get(added)) if added else 0
    print(f"ingested {len(added)} documents ({n_tok} tokens, {n_tok / max(dt, 1e-9):.0f} tok/s)"
          f"{f', skipped {skipped} already present' if skipped else ''}; memory {args.memory}: "
          f"{len(engine)} documents, {engine.memory.nbytes / 1e6:.2f} MB")
    return 0


def print_result(res, out=sys.stdout) -> None:
    print(f"Answer: {res.answer}", file=out)
    print("Routed documents:", file=out)
    for d in res.documents:
        print(f"  [{d.rank + 1}] {d.id}  score={d.score:.4f}  round={d.round}", file=out)
    t = res.timings
    print(f"Timings: routing {t['routing_s'] * 1e3:.0f} ms, first token {t['first_token_s'] * 1e3:.0f} ms, "
          f"prefill {t['prefill_s'] * 1e3:.0f} ms, decode {t['decode_s'] * 1e3:.0f} ms, total {t['total_s']:.2f} s; "
          f"tokens: {res.prompt_tokens} prompt + {res.completion_tokens} generated", file=out)


def cmd_ask(args) -> int:
    engine = _engine(args)
    engine.load(args.memory)
    res = engine.query(args.question, mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens,
                       rounds=args.rounds)
    if args.json:
        print(json.dumps({"answer": res.answer, "documents": [d.__dict__ for d in res.documents],
                          "timings": res.timings, "usage": res.usage}, indent=1))
    else:
        print_result(res)
    return 0


def cmd_info(args) -> int:
    from .engine.memory import read_manifest

    m = read_manifest(args.memory)
    print(json.dumps({k: m[k] for k in ("format_version", "fingerprint", "n_documents", "n_chunks", "n_tokens")},
                     indent=1))
    return 0


def cmd_demo(args) -> int:
    """Ingest the sample corpus and answer a few questions, printing routed documents and timings."""
    import tempfile

    data = os.path.join(EXAMPLES_DIR, "data")
    files = sorted(glob.glob(os.path.join(data, "*.txt")))
    with open(os.path.join(EXAMPLES_DIR, "questions.txt")) as f:
        questions = [q.strip() for q in f if q.strip()]
    engine = _engine(args)
    print(f"Model: {engine.name}, routing layers {engine.routing_layers[0]}..{engine.routing_layers[-1]}, "
          f"router: {engine.router.fingerprint()}")
    texts = [read_text_file(p) for p in files]
    t0 = time.perf_counter()
    engine.add(texts, ids=[os.path.basename(p) for p in files])
    print(f"Ingested {len(files)} documents ({engine.memory.n_tokens} tokens) in {time.perf_counter() - t0:.1f} s; "
          f"memory {engine.memory.nbytes / 1e6:.2f} MB")
    memory_dir = args.memory or tempfile.mkdtemp(prefix="msa-demo-")
    engine.save(memory_dir)
    print(f"Saved the memory to {memory_dir}")
    for q in questions:
        print(f"\nQuestion: {q}")
        print_result(engine.query(q, mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="msa", description="Memory Sparse Attention memory for a local LLM")
    p.add_argument("--model", default=None, help="local HF folder or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument("--router", default=None, help="router adapter folder (msa train-router)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ingest", help="add text files to a memory folder (created if missing)")
    s.add_argument("files", nargs="+")
    s.add_argument("--memory", required=True)
    s.add_argument("--chunk-size", type=int, default=None)
    s.add_argument("--keep-inputs", action="store_true", help="keep pooled layer inputs (re-keyable memory)")
    s.set_defaults(fn=cmd_ingest)

    for name, fn, helptext in (("ask", cmd_ask, "answer a question from a memory folder"),
                               ("demo", cmd_demo, "ingest the sample corpus and answer a few questions")):
        s = sub.add_parser(name, help=helptext)
        if name == "ask":
            s.add_argument("question")
            s.add_argument("--memory", required=True)
            s.add_argument("--json", action="store_true")
            s.add_argument("--rounds", type=int, default=None)
        else:
            s.add_argument("--memory", default=None, help="where to save the demo memory")
        s.add_argument("--mode", default=None, choices=["interleave", "sparse", "protocol"])
        s.add_argument("-k", "--k", type=int, default=2 if name == "demo" else None,
                       help="documents to route to (demo: 2, since a 135M model reads few documents well)")
        s.add_argument("--max-new-tokens", type=int, default=64)
        s.add_argument("--chunk-size", type=int, default=None)
        s.set_defaults(fn=fn)

    s = sub.add_parser("info", help="describe a saved memory folder")
    s.add_argument("memory")
    s.set_defaults(fn=cmd_info)

    from .train_cli import add_parser as add_train_router_parser  # `msa train-router` (issue 4)
    add_train_router_parser(sub)
    from .eval_cli import add_parser as add_eval_parser  # `msa eval` (issue 3)
    add_eval_parser(sub)

    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for reports
    try:
        return args.fn(args)
    except (ValueError, TypeError, KeyError, LookupError, FileNotFoundError) as e:
        print(f"msa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
