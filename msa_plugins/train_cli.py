"""`msa train-router`: train a router adapter for any model on any corpus.

    msa train-router --corpus docs/*.txt --out my-router                 # no labels (as `msa adapt` trains)
    msa train-router --corpus corpus.jsonl --pairs qa.jsonl --out my-router
    msa --model ./my-hf-model train-router --pairs qa.jsonl --out my-router --layers 16,20,24

By default it fine-tunes the model's trained router (the shipped one for the embedded model) on
inverse-cloze pseudo-queries (and --pairs questions), distilling MiniLM / BM25 when installed, with mined
negatives; a model with no trained router gets a new one on --layers.

Corpus files: .txt/.md (one document per file; a short first line followed by more text is its title, as
`msa adapt` reads a memory document), .jsonl / .json (records with "text", optional "id",
"title"). Pairs JSONL: {"question": ..., "doc_ids": [...]} (ids of corpus documents) or
{"question": ..., "positives": ["document text", ...]} (added to the corpus when missing).
Writes ROUTER_DIR/router.safetensors (MSA-4B weight names) + router.json, loadable with
`MSAEngine.from_pretrained(..., router=ROUTER_DIR)`; the feature cache goes to ROUTER_DIR/features
(delete it to save space; keep it to retrain without re-encoding) and checkpoints to ROUTER_DIR/train
(a rerun with the same settings resumes from them, one with other settings starts afresh; `--no-resume`
also re-encodes the features).

`cli.main` owns the global options (--model, --device) and turns msa-plugins errors into one-line
messages; this module adds the sub-command (`add_parser`) and runs it (`cmd_train_router`).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Optional

from .errors import DuplicateIdError, InvalidArgumentError, RouterMismatchError


def _read_json_records(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            recs = json.load(f)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"{path}: not valid JSON ({e}); fix the file") from e
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path} is not UTF-8 text ({e}); convert it and retry") from e
    except OSError as e:
        raise InvalidArgumentError(f"cannot read {path}: {e.strerror}") from e
    if not isinstance(recs, list):
        raise InvalidArgumentError(f"{path}: expected a JSON list of records, got {type(recs).__name__}")
    return recs


def _title_and_text(content: str) -> tuple:
    """A text file's (title, text): its first line as the title when `msa adapt` would take it as one
    (`trainer.split_title`: short, followed by more text), so the title is a pseudo-query here too; the
    document the router is trained on stays the file's exact text ("title\ntext" == content)."""
    from .trainer import split_title

    title, text = split_title(content)
    return (title, text) if title and f"{title}\n{text}" == content else ("", content)


def read_corpus(patterns) -> list:
    """Corpus files or globs -> list of (id, title, text). Ids: the record's "id", else `<file>#<i>`
    (JSON) or the file path (text files). A text file's first line is its title when it looks like one."""
    docs = []
    for pattern in patterns or []:
        files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not files:
            raise InvalidArgumentError(f"--corpus {pattern!r} matches no files")
        for path in files:
            if os.path.isdir(path):
                continue
            if not os.path.isfile(path):
                raise InvalidArgumentError(f"corpus file {path!r} does not exist")
            if path.endswith((".jsonl", ".json")):
                for i, r in enumerate(_read_json_records(path)):
                    if isinstance(r, str):
                        r = {"text": r}
                    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                        raise InvalidArgumentError(f"{path}: record {i} has no \"text\" string")
                    docs.append((str(r.get("id", f"{os.path.relpath(path)}#{i}")), str(r.get("title") or ""),
                                 r["text"]))
            else:
                try:
                    with open(path, encoding="utf-8") as f:
                        docs.append((os.path.relpath(path), *_title_and_text(f.read())))
                except UnicodeDecodeError as e:
                    raise InvalidArgumentError(f"{path} is not UTF-8 text ({e}); convert it and retry") from e
                except OSError as e:
                    raise InvalidArgumentError(f"cannot read {path}: {e.strerror}") from e
    seen = set()
    for d, _, _ in docs:
        if d in seen:
            raise DuplicateIdError(f"document id {d!r} appears twice in the corpus; give each record its own id")
        seen.add(d)
    return docs


def read_pairs(path, docs) -> list:
    """-> list of (question, [doc ids]); `positives` texts missing from docs are appended to docs. A positive
    names a document by its text, or by its title line and text as a file holds them."""
    by_text = {}
    for d, t, x in docs:
        by_text[x] = d
        if t:
            by_text.setdefault(f"{t}\n{x}", d)
    known = {d for d, _, _ in docs}
    pairs = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the --pairs file {path!r}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"{path}:{n}: not valid JSON ({e})") from e
            if not isinstance(r, dict) or not isinstance(r.get("question"), str) or not r["question"].strip():
                raise InvalidArgumentError(f"{path}:{n}: needs a non-empty \"question\" string")
            ids = [str(i) for i in r.get("doc_ids", [])]
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise InvalidArgumentError(f"{path}:{n}: doc_ids {unknown[:3]} are not ids of the corpus")
            for text in r.get("positives", []):
                if text not in by_text:
                    by_text[text] = f"pair-doc-{len(docs)}"
                    docs.append((by_text[text], "", text))
                    known.add(by_text[text])
                ids.append(by_text[text])
            if not ids:
                raise InvalidArgumentError(f"{path}:{n} has no doc_ids or positives")
            pairs.append((r["question"], ids))
    return pairs


def add_parser(sub) -> None:
    """Add `train-router` to `msa`'s sub-commands (the global --model and --device come from cli.main)."""
    s = sub.add_parser("train-router", help="train a router adapter on a corpus and/or question pairs")
    s.add_argument("--corpus", nargs="*", default=[], help="corpus files or globs (.txt/.md/.jsonl/.json)")
    s.add_argument("--pairs", default=None, help="JSONL of {question, doc_ids|positives}")
    s.add_argument("--out", required=True, help="router adapter folder to write")
    s.add_argument("--layers", default=None, help="routing layers of a new router, e.g. 15,18,21,24,27 (default: the "
                   "fine-tuned router's own, else the model's upper half)")
    s.add_argument("--chunk-size", type=int, default=64)
    s.add_argument("--routing-chunk-size", type=int, default=None,
                   help="tokens per pooled routing key in the features (default: 16, or --chunk-size when smaller); "
                        "use the value of the memories the router will key")
    s.add_argument("--ict-per-doc", type=int, default=2, help="inverse-cloze sentences per document (0: none)")
    s.add_argument("--no-titles", action="store_true", help="do not use titles as inverse-cloze queries")
    s.add_argument("--init", default="current",
                   help="current: fine-tune the model's trained router (--router or $MSA_ROUTER, else an MSA-4B "
                        "checkpoint's own or the one shipped for the embedded model), or start tied-random when it "
                        "has none; "
                        "qk, tied-random, identity or random: a new router on --layers")
    s.add_argument("--teachers", default="auto",
                   help="teacher retrievers to distil on every training query: auto (those installed), none, "
                        "or a list such as minilm,bm25")
    s.add_argument("--negatives", default="mined", choices=("mined", "bank"),
                   help="mined: the router's and the teachers' hard negatives plus random ones; bank: every "
                        "other document")
    s.add_argument("--epochs", type=int, default=None,
                   help="(default: 4 when fine-tuning a trained router, 10 for a new one)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--tau", type=float, default=0.1)
    s.add_argument("--dev-fraction", type=float, default=0.1)
    s.add_argument("--patience", type=int, default=None,
                   help="epochs without a better dev MRR before stopping (default: 2 when fine-tuning, 3 for a "
                        "new router)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-resume", action="store_true", help="ignore the feature cache and checkpoints in --out")
    s.add_argument("--export-msa4b", default=None, help="also write one safetensors file with MSA-4B names")
    s.set_defaults(fn=cmd_train_router)


def _layers(text):
    try:
        return [int(x) for x in text.split(",") if x.strip()] if text else None
    except ValueError as e:
        raise InvalidArgumentError(f"--layers must be comma-separated layer indices, got {text!r}") from e


def cmd_train_router(args) -> int:
    """`msa train-router`: by default the adaptation setting (`msa adapt`, docs/results/routing_levers.md)
    on the given corpus: fine-tune the model's trained router, distil the installed teachers, mined
    negatives; `--init tied-random --teachers none --negatives bank` is the plain InfoNCE recipe."""
    from . import MSAEngine
    from .trainer import INITS, TrainConfig, adapt_train_config, check_out_dir, resolve_teachers, train_router_for

    docs = read_corpus(args.corpus)
    pairs = read_pairs(args.pairs, docs) if args.pairs else []
    if not docs:
        raise InvalidArgumentError("nothing to train on: give --corpus files and/or --pairs")
    if args.init != "current" and args.init not in INITS:
        raise InvalidArgumentError(f"--init must be 'current' or one of {list(INITS)}, got {args.init!r}")
    if args.init != "current" and args.router not in (None, "none", "qk"):
        raise InvalidArgumentError(f"--router names the router to fine-tune, which --init {args.init} does not do; "
                                   "drop --router, or drop --init to fine-tune it")
    teachers = resolve_teachers(_teachers(args.teachers))  # an unknown or missing teacher fails here, not later
    layers = _layers(args.layers)

    def make_config(fine_tune: bool) -> TrainConfig:  # fine-tuning: adaptation's epochs and patience
        settings = dict(batch_size=args.batch_size, lr=args.lr, tau=args.tau, seed=args.seed, negatives=args.negatives,
                        epochs=args.epochs if args.epochs is not None else (4 if fine_tune else 10),
                        patience=args.patience if args.patience is not None else (2 if fine_tune else 3))
        if fine_tune:
            return adapt_train_config(**settings)
        return TrainConfig(init="tied-random" if args.init == "current" else args.init, **settings)

    make_config(False)  # the settings and the output folder are checked before the model is loaded
    check_out_dir(args.out)
    build = dict(model=args.model, device=args.device, chunk_size=args.chunk_size,
                 routing_chunk_size=args.routing_chunk_size)
    init_router = None
    if args.init == "current" and args.router not in ("none", "qk"):
        known = _starting_router_layers(args)  # read before the model loads, when the router is a folder
        if known is not None and layers is not None and sorted(layers) != sorted(known):
            raise InvalidArgumentError(f"--layers {args.layers} differs from the layers of the router being fine-tuned "
                                       f"({','.join(map(str, known))}): drop --layers, or train a new router on them "
                                       "with --init tied-random")
        try:  # a model without a trained router routes training-free on --layers: one load either way
            engine = MSAEngine.from_pretrained(router=args.router, routing_layers=layers if known is None else None,
                                               **build)
        except RouterMismatchError as e:  # an MSA-4B checkpoint's own router on other layers than --layers
            if layers is None:
                raise
            raise InvalidArgumentError(f"--layers {args.layers} does not fit the model's own router ({e}): drop "
                                       "--layers, or train a new router on them with --init tied-random") from e
        if engine.has_trained_router:
            init_router = engine.router
    else:
        if args.init != "current" and os.environ.get("MSA_ROUTER"):  # a default, not an error as --router is
            print(f"note: $MSA_ROUTER ({os.environ['MSA_ROUTER']}) is not used: --init {args.init} trains a new "
                  "router", file=sys.stderr)
        # features need no router: the training-free one, on the requested (or the model's upper half) layers
        engine = MSAEngine.from_pretrained(router="none", routing_layers=layers, **build)
    fine_tune = init_router is not None
    config = make_config(fine_tune)
    start = f"from {init_router.fingerprint()}" if fine_tune else f"a new router ({config.init})"
    print(f"training {start} on layers {','.join(map(str, engine.routing_layers))}", flush=True)
    result = train_router_for(engine, docs, pairs, out=args.out, config=config, dev_fraction=args.dev_fraction,
                              ict_per_doc=args.ict_per_doc, ict_titles=not args.no_titles,
                              resume=not args.no_resume, export_msa4b_path=args.export_msa4b,
                              teachers=teachers, init_router=init_router)
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in result.dev_metrics.items())
    method = result.router.meta.get("provenance", {}).get("method", "")
    print(f"router written to {args.out} ({method}; {result.n_train} training queries, {result.n_dev} dev"
          + (f"; {metrics}" if metrics else "") + ")")
    return 0


# ---------------------------------------------------------------------- msa adapt / msa ingest --adapt
ROUTER_SUBDIR = "router"  # an adapted memory keeps the router that keys it in <memory>/router


def add_adapt_arguments(s, prefix: str = "") -> None:
    """The adaptation options (shared by `msa adapt` and `msa ingest --adapt`; `prefix` e.g. "adapt-")."""
    s.add_argument(f"--{prefix}epochs", type=int, default=None, help="training epochs (default: 4, early stopping "
                   "on held-out pseudo-queries)")
    s.add_argument(f"--{prefix}teachers", default="auto",
                   help="teacher retrievers to distil: auto (those installed), none, or a list such as minilm,bm25")
    s.add_argument(f"--{prefix}seed", type=int, default=0)
    s.add_argument(f"--{prefix}out", default=None,
                   help="router folder to write (default: <memory>/router, where `msa adapt` finds it again)")
    s.add_argument(f"--{prefix}no-resume", action="store_true", help="ignore checkpoints of an interrupted adaptation")
    s.add_argument(f"--{prefix}doc2query", action="store_true",
                   help="also train on one question per document written by the model itself (doc2query; "
                        "better routing; generation takes several times as long as encoding the documents on a CPU)")
    s.add_argument(f"--{prefix}keep-checkpoints", action="store_true",
                   help="keep the training checkpoints (<out>/train, about 5x the router) after a finished "
                        "adaptation, to train on later with more epochs; by default they are removed")


def add_adapt_parser(sub) -> None:
    """Add `adapt` to `msa`'s sub-commands (the global --model, --router and --device come from cli.main)."""
    s = sub.add_parser("adapt", help="adapt the router to a saved memory's own documents (no labels) and re-key it")
    s.add_argument("--memory", required=True, help="saved memory folder (built with --keep-inputs)")
    add_adapt_arguments(s)
    s.set_defaults(fn=cmd_adapt)


def _teachers(text):
    if text in ("auto", "none"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _starting_router_layers(args) -> Optional[list]:
    """The layers of the router `msa train-router --init current` fine-tunes, when it is a folder that can be
    read before the model loads (--router, $MSA_ROUTER, or the router shipped for the embedded model); None
    when only the loaded model can tell (an MSA-4B checkpoint's own router, or none)."""
    from .models import DEFAULT_ROUTER_DIR
    from .trainer import Router

    folder = args.router or os.environ.get("MSA_ROUTER") or None
    if folder is None and (args.model or os.environ.get("MSA_MODEL") or "default") == "default":
        folder = DEFAULT_ROUTER_DIR
    if folder is None or folder in ("none", "qk"):
        return None
    return list(Router.load(folder).layers)


def adapt_engine(engine, memory: str, *, epochs=None, teachers="auto", seed: int = 0, out=None, resume: bool = True,
                 encoding_s: Optional[float] = None, keep_checkpoints: bool = False, doc2query: bool = False) -> str:
    """Adapt `engine`'s router to its memory (see `trainer.adapt_router_for`), write the router to `out`
    (default <memory>/router) and return a one-line report with the cost (and its ratio to `encoding_s`, the
    encoding time of the same documents, when known). The caller saves the memory (now re-keyed)."""
    from .trainer import AdaptConfig, adapt_router_for

    out = out or os.path.join(memory, ROUTER_SUBDIR)
    res = adapt_router_for(engine, epochs=epochs, seed=seed, resume=resume, out=out, teachers=_teachers(teachers)
                           if isinstance(teachers, str) else teachers, keep_checkpoints=keep_checkpoints,
                           config=AdaptConfig(doc2query=doc2query))
    p, t = res.provenance, res.timings
    ratio = f", {t['total'] / encoding_s:.2f}x the encoding time" if encoding_s else ""
    # the router kept is the best epoch's (the first to reach the highest held-out MRR), not the last one's
    scored = [h for h in res.history if h.get("dev_mrr") is not None]
    best = max(scored, key=lambda h: h["dev_mrr"]) if scored else {}
    dev = (f"; held-out pseudo-query MRR {scored[0]['dev_mrr']:.3f} -> {best['dev_mrr']:.3f} (epoch {best['epoch']} "
           "kept)" if best else "")
    parts = [f"pseudo-query features {t['query_features']:.0f} s"]
    if doc2query:
        parts.append(f"doc2query {t['doc2query']:.0f} s ({p['doc2query_questions']} questions)")
    parts += [f"teachers {t['teachers']:.0f} s", f"training {t['train']:.0f} s", f"re-keying {t['rekey']:.1f} s"]
    return (f"router adapted ({p['method']}, teachers: {', '.join(p['teachers']) or 'none'}, "
            f"{p['epochs_run']} epochs on {p['train_queries']} pseudo-queries of {p['documents']} documents) in "
            f"{t['total']:.0f} s{ratio} ({', '.join(parts)}){dev}; written to {out}")


def cmd_adapt(args) -> int:
    """`msa adapt --memory M`: load M under its writer lock, adapt, re-key, save M (and M/router)."""
    from . import MSAEngine

    if not os.path.isfile(os.path.join(args.memory, "manifest.json")):
        what = "does not exist" if not os.path.exists(args.memory) else "holds no memory (manifest.json)"
        raise InvalidArgumentError(f"{args.memory} {what}; create a memory with `msa ingest FILES --memory "
                                   f"{args.memory} --keep-inputs` (or `--adapt`)")
    # the router that keys M now: its adapted one, or the (maybe earlier) shipped one
    router = args.router or MSAEngine.router_for_memory(args.memory, args.model)
    engine = MSAEngine.from_pretrained(model=args.model, router=router, device=args.device, keep_inputs=True)
    with engine.edit_saved(args.memory):
        line = adapt_engine(engine, args.memory, epochs=args.epochs, teachers=args.teachers, seed=args.seed,
                            out=args.out, resume=not args.no_resume, keep_checkpoints=args.keep_checkpoints,
                            doc2query=args.doc2query)
    print(line)
    return 0


def adapt_after_ingest(engine, args, encoding_s: Optional[float]) -> str:
    """For `msa ingest --adapt`: call inside the ingest's `edit_saved` block, after the upsert (the memory
    is saved re-keyed when the block ends). Returns the report line to print."""
    return adapt_engine(engine, args.memory, epochs=args.adapt_epochs, teachers=args.adapt_teachers,
                        seed=args.adapt_seed, out=args.adapt_out, resume=not args.adapt_no_resume,
                        encoding_s=encoding_s, keep_checkpoints=args.adapt_keep_checkpoints,
                        doc2query=args.adapt_doc2query)
