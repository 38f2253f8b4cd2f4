"""`msa` command line: ingest files into a memory, ask it questions, inspect it, run the demo.

    msa ingest notes/ README.md --memory mem      # .txt/.md files of notes/ (recursively) and README.md
    msa ask "Who built the lighthouse?" --memory mem
    msa info mem
    msa demo                                      # the sample corpus shipped inside the package

Ingest: a document's id is its file's resolved path (symlinks followed, absolute), so the same file gets
the same id whatever the current directory and whichever link or relative path names it; with
`--relative-to DIR` ids are paths relative to DIR instead (portable memories). A file reached twice
(two links, a link loop) is stored once. Re-ingesting a file whose text changed replaces the old
document; unchanged files are left alone; the command reports both counts. The memory folder is edited
under its writer lock (a second `msa ingest` on the same folder waits), re-read under that lock, and
saved atomically.

Errors (a missing file, a folder that is not a memory, a read-only destination, bad options) print one
line on stderr and exit with status 2; the destination is checked before any model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from importlib import resources

from .config import RERANK_SCORINGS, AnswerOptions
from .errors import InvalidArgumentError, MemoryFormatError, MSAError
from .validation import check_text

INGEST_SUFFIXES = (".txt", ".md")  # what a folder walk picks up; files named explicitly may have any name
MANIFEST = "manifest.json"
LOCK_FILE = ".msa-lock"  # the writer lock a memory folder may hold before its first save (engine storage)
EXIT_ERROR = 2


# ---------------------------------------------------------------- files

def collect_files(patterns, suffixes=INGEST_SUFFIXES) -> list:
    """Files named by `patterns` (paths, folders walked recursively for `suffixes`, glob patterns), as
    resolved real paths, each once, in the order given. A path that does not exist, or a pattern that
    matches nothing, is an error (nothing is read or encoded). Hidden files and folders (".git") are
    skipped in folder walks; a folder reached twice (a symlink loop) is walked once."""
    found: dict = {}  # real path -> None: an ordered set
    walked: set = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InvalidArgumentError(f"{pattern}: no file matches this pattern")
        for path in matches:
            if os.path.isdir(path):
                for f in _walk(path, suffixes, walked):
                    found.setdefault(f, None)
            elif os.path.isfile(path):
                found.setdefault(os.path.realpath(path), None)
            elif os.path.lexists(path):
                raise InvalidArgumentError(f"{path}: not a regular file or folder (a broken link?)")
            else:
                raise InvalidArgumentError(f"{path}: no such file or folder")
    return list(found)


def _walk(top: str, suffixes, walked: set):
    for root, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:  # a link back to a folder already walked: its files are already in
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.startswith(".") and name.endswith(suffixes) and os.path.isfile(path):
                yield os.path.realpath(path)


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
                                   "(e.g. `iconv -t utf-8`) and retry") from None


def document_ids(files: list, relative_to=None) -> list:
    """Resolved paths, or paths relative to `relative_to` (which must hold every file). A '#' in a path becomes
    '%23': the engine keeps '#' for the parts of a long text, and a file's name is not the user's to change."""
    if relative_to is None:
        return [f.replace("#", "%23") for f in files]
    root = os.path.realpath(relative_to)
    ids = []
    for f in files:
        rel = os.path.relpath(f, root)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise InvalidArgumentError(f"{f} is not inside --relative-to {relative_to}; give a folder holding "
                                       "every input, or leave --relative-to out (ids are then absolute paths)")
        ids.append(rel.replace(os.sep, "/").replace("#", "%23"))
    return ids


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- memory folders

def holds_memory(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MANIFEST))


def check_destination(directory: str) -> None:
    """A memory folder may be written here: it is a memory, an empty folder, or a path that can be created,
    and it is writable. Checked before any model is loaded or document encoded."""
    if os.path.isdir(directory):
        if not holds_memory(directory) and any(n != LOCK_FILE for n in os.listdir(directory)):
            raise InvalidArgumentError(f"{directory} is a folder with files in it but no memory ({MANIFEST}); "
                                       "give a memory folder, an empty folder or a new path")
        _check_writable(directory)
        return
    if os.path.lexists(directory):
        raise InvalidArgumentError(f"{directory} exists and is not a folder; give a memory folder or a new path")
    parent = os.path.dirname(os.path.abspath(directory))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"cannot create {directory}: {parent} is not a folder")
    _check_writable(parent, creating=directory)


def _check_writable(folder: str, creating=None) -> None:
    # a real probe, not os.access: it also catches read-only mounts and ACLs
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".msa-probe-"):
            pass
    except OSError as e:
        what = f"cannot create {creating} in {folder}" if creating else f"cannot write to {folder}"
        raise InvalidArgumentError(f"{what}: {e.strerror or e}; choose a writable location") from None


def require_memory(directory: str) -> None:
    if not holds_memory(directory):
        what = "does not exist" if not os.path.exists(directory) else f"holds no memory ({MANIFEST})"
        raise InvalidArgumentError(f"{directory} {what}; create a memory with `msa ingest FILES --memory {directory}`")


def read_manifest_summary(directory: str) -> dict:
    """The description a saved memory's manifest gives of it (no model needed)."""
    require_memory(directory)
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        return {k: manifest[k] for k in ("format_version", "fingerprint", "n_documents", "n_chunks", "n_tokens")}
    except (ValueError, KeyError, TypeError) as e:
        raise MemoryFormatError(f"{path} is not a readable memory manifest ({type(e).__name__}: {e}); "
                                "the folder is damaged or from another tool") from None


# ---------------------------------------------------------------- commands

def _engine(args):
    from . import MSAEngine

    overrides = {}
    for name in ("k", "chunk_size", "routing_chunk_size", "rerank_scoring"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "keep_inputs", False):
        overrides["keep_inputs"] = True
    router = args.router
    if router is None and getattr(args, "memory", None):  # the router that keyed it (adapted, or an earlier default)
        router = MSAEngine.router_for_memory(args.memory, args.model)
    return MSAEngine.from_pretrained(model=args.model, router=router, device=args.device, **overrides)


@dataclasses.dataclass
class IngestPlan:
    """What an ingest does to the memory: ids to add, ids whose text changed, ids left as they are."""
    added: list
    replaced: list
    unchanged: list

    @classmethod
    def against(cls, snapshot, ids: list, hashes: list) -> "IngestPlan":
        plan = cls([], [], [])
        for doc_id, digest in zip(ids, hashes):
            if doc_id not in snapshot:
                plan.added.append(doc_id)
            elif snapshot.get([doc_id])[0].metadata.get("sha256") == digest:
                plan.unchanged.append(doc_id)
            else:
                plan.replaced.append(doc_id)
        return plan


def cmd_ingest(args) -> int:
    files = collect_files(args.files)
    if not files:
        raise InvalidArgumentError(f"no {'/'.join(INGEST_SUFFIXES)} files found in {' '.join(args.files)}")
    texts = [read_text_file(f) for f in files]  # read everything first: a bad file adds nothing
    empty = [f for f, t in zip(files, texts) if not t.strip()]  # nothing to remember: skipped, and named
    if empty:
        if len(empty) == len(files):
            raise InvalidArgumentError(f"every file given is empty or whitespace only ({', '.join(empty[:3])}"
                                       f"{', ...' if len(empty) > 3 else ''}); nothing to ingest")
        files, texts = zip(*[(f, t) for f, t in zip(files, texts) if t.strip()])
        files, texts = list(files), list(texts)
    ids = document_ids(files, args.relative_to)
    hashes = [text_sha256(t) for t in texts]
    check_destination(args.memory)
    if args.adapt:
        args.keep_inputs = True  # adaptation re-keys from the pooled layer inputs
    engine = _engine(args)
    t0 = time.perf_counter()
    adapted = None
    with engine.edit_saved(args.memory):  # locked: load what is saved now, change it, save
        plan = IngestPlan.against(engine.snapshot(), ids, hashes)
        todo = set(plan.added) | set(plan.replaced)
        batch = [(i, t, {"source": f, "sha256": h}) for i, t, f, h in zip(ids, texts, files, hashes) if i in todo]
        if batch:
            engine.upsert([t for _, t, _ in batch], ids=[i for i, _, _ in batch], metadata=[m for _, _, m in batch])
        dt = time.perf_counter() - t0
        if args.adapt:
            from .train_cli import adapt_after_ingest

            adapted = adapt_after_ingest(engine, args, dt)
    n_tok = sum(d.n_tokens for d in engine.get(sorted(todo))) if todo else 0
    info = engine.info()
    print(f"ingested {len(files)} files: {len(plan.added)} added, {len(plan.replaced)} replaced, "
          f"{len(plan.unchanged)} unchanged ({n_tok} tokens encoded, {n_tok / max(dt, 1e-9):.0f} tok/s); "
          f"memory {args.memory}: {info['documents']} documents, {info['bytes'] / 1e6:.2f} MB")
    if empty:
        print(f"skipped {len(empty)} empty file(s): {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}",
              file=sys.stderr)
    if adapted:
        print(adapted)
    return 0


def print_result(res, out=None) -> None:
    out = out or sys.stdout
    print(f"Answer: {res.answer}", file=out)
    print("Routed documents:", file=out)
    for d in res.documents:
        print(f"  [{d.rank + 1}] {d.id}  score={d.score:.4f}  round={d.round}", file=out)
    t = res.timings
    print(f"Timings: routing {t['routing_s'] * 1e3:.0f} ms, first token {t['first_token_s'] * 1e3:.0f} ms, "
          f"prefill {t['prefill_s'] * 1e3:.0f} ms, decode {t['decode_s'] * 1e3:.0f} ms, total {t['total_s']:.2f} s; "
          f"tokens: {res.prompt_tokens} prompt + {res.completion_tokens} generated", file=out)


def cmd_ask(args) -> int:
    # the question and options are checked before the model loads: a mistake costs no time
    check_text(args.question)
    options = dict(mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens, rounds=args.rounds,
                   k_per_round=args.k_per_round, rerank=args.rerank)
    AnswerOptions().merged(**options)
    if args.rerank_scoring and not args.rerank:  # it changes how reranked documents are scored, nothing else
        raise InvalidArgumentError(f"--rerank-scoring {args.rerank_scoring} scores the documents --rerank N "
                                   "reorders; add --rerank N (e.g. 20), or drop --rerank-scoring")
    require_memory(args.memory)
    engine = _engine(args)
    engine.load(args.memory)
    res = engine.query(args.question, **options)
    if args.json:
        print(json.dumps({"answer": res.answer, "documents": [dataclasses.asdict(d) for d in res.documents],
                          "timings": res.timings, "usage": res.usage}, indent=1))
    else:
        print_result(res)
    return 0


def cmd_info(args) -> int:
    print(json.dumps(read_manifest_summary(args.memory), indent=1))
    return 0


def demo_data():
    """The sample corpus shipped inside the package: (list of (file name, text), questions)."""
    root = resources.files("msa_plugins") / "data" / "demo"
    docs = sorted((p.name, p.read_text(encoding="utf-8")) for p in (root / "docs").iterdir() if p.name.endswith(".txt"))
    questions = [q.strip() for q in (root / "questions.txt").read_text(encoding="utf-8").splitlines() if q.strip()]
    return docs, questions


def cmd_demo(args) -> int:
    """Ingest the sample corpus and answer a few questions, printing routed documents and timings."""
    docs, questions = demo_data()
    if args.memory:
        check_destination(args.memory)
    engine = _engine(args)
    info = engine.info()
    layers = info["routing_layers"]
    print(f"Model: {info['model']}, routing layers {layers[0]}..{layers[-1]}, router: {info['router']}")
    t0 = time.perf_counter()
    engine.add([text for _, text in docs], ids=[name for name, _ in docs])
    info = engine.info()
    print(f"Ingested {len(docs)} documents ({info['tokens']} tokens) in {time.perf_counter() - t0:.1f} s; "
          f"memory {info['bytes'] / 1e6:.2f} MB")
    memory_dir = args.memory or tempfile.mkdtemp(prefix="msa-demo-")
    engine.save(memory_dir)
    print(f"Saved the memory to {memory_dir}")
    for q in questions:
        print(f"\nQuestion: {q}")
        print_result(engine.query(q, mode=args.mode, k=args.k, max_new_tokens=args.max_new_tokens))
    return 0


# ---------------------------------------------------------------- parser and entry point

def _states_default(action: argparse.Action) -> bool:
    """Whether `--help` should show this option's default: an option with a real value as default."""
    default = action.default
    if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, (str, list, tuple)) and not default)  # nothing to show for "" or []


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in `--help`, "(default: X)", unless its help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or not _states_default(action):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """`msa`'s parser and every sub-command's (argparse builds sub-parsers with the parent's class): shows
    defaults in `--help`, also for options that have no help text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        if action.help is None and _states_default(action):
            action.help = "(default: %(default)s)"  # argparse prints nothing for an option without help
        return action


# Options given before the sub-command (`msa --model M eval ...`) that every model-loading sub-command also
# accepts after it (`msa eval ... --model M`), with the same meaning.
GLOBAL_OPTIONS = (
    ("--model", "local HF folder or .gguf file (default: embedded SmolLM2-135M)"),
    ("--router", "router adapter folder (msa train-router; default: the model's own, or the one shipped for "
                 "the embedded model)"),
    ("--device", "cpu or cuda (default: cuda when available)"),
)
_AFTER = "_after_command"  # dest suffix of the copies after the sub-command
_NO_MODEL_COMMANDS = ("info",)  # sub-commands that load no model


def _add_global_options_after(sub) -> None:
    """Give every model-loading sub-command the global options too (merged by `merge_global_options`)."""
    for name, s in sub.choices.items():
        if name in _NO_MODEL_COMMANDS:
            continue
        for flag, help_text in GLOBAL_OPTIONS:
            try:
                s.add_argument(flag, dest=flag[2:] + _AFTER, default=argparse.SUPPRESS,
                               metavar=flag[2:].upper(), help=f"{help_text}; may also come before the sub-command")
            except argparse.ArgumentError:  # the sub-command has an option of that name itself
                pass


def merge_global_options(args, parser: argparse.ArgumentParser) -> None:
    """`--model/--router/--device` after the sub-command mean the same as before it. Given in both places
    with different values, the command is refused (exit status 2), since which one was meant is unclear."""
    for flag, _ in GLOBAL_OPTIONS:
        name = flag[2:]
        after = vars(args).pop(name + _AFTER, None)
        if after is None:
            continue
        before = getattr(args, name, None)
        if before is not None and before != after:
            parser.error(f"{flag} is given before the sub-command ({before}) and after it ({after}); give it once")
        setattr(args, name, after)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="msa", description="Memory Sparse Attention memory for a local LLM")
    for flag, help_text in GLOBAL_OPTIONS:
        p.add_argument(flag, default=None, help=help_text)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("ingest", help="add or update text files in a memory folder (created if missing)")
    s.add_argument("files", nargs="+", help="files, folders (their .txt/.md files, recursively) or glob patterns")
    s.add_argument("--memory", required=True)
    s.add_argument("--relative-to", default=None, metavar="DIR",
                   help="document ids relative to DIR (default: each file's resolved absolute path)")
    s.add_argument("--chunk-size", type=int, default=None, help="tokens per pooled content chunk (default 64)")
    s.add_argument("--routing-chunk-size", type=int, default=None,
                   help="tokens per pooled routing key (default: 16, or the chunk size when smaller)")
    s.add_argument("--keep-inputs", action="store_true", help="keep pooled layer inputs (re-keyable memory)")
    s.add_argument("--adapt", action="store_true",
                   help="then adapt the router to the memory's documents (no labels) and re-key it (implies --keep-inputs)")
    from .train_cli import add_adapt_arguments

    add_adapt_arguments(s, prefix="adapt-")
    s.set_defaults(fn=cmd_ingest)

    s = sub.add_parser("ask", help="answer a question from a memory folder")
    s.add_argument("question")
    s.add_argument("--memory", required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--rounds", type=int, default=None, help="interleave routing rounds (multi-hop)")
    s.add_argument("--k-per-round", action=argparse.BooleanOptionalAction, default=None,
                   help="with --rounds > 1: every round adds k documents (default), or with --no-k-per-round k is "
                        "the total, split over the rounds")
    s.add_argument("--rerank", type=int, default=None, metavar="N",
                   help="reorder the router's top N documents (at least k) by how likely the model finds the "
                        "question given each; costs N short forward passes (default 0: off)")
    s.add_argument("--rerank-scoring", choices=RERANK_SCORINGS, default=None,
                   help="with --rerank: 'single' scores each document alone (the default); 'path' also scores it "
                        "after the top one's text, for multi-hop questions (N more forward passes, about twice as "
                        "long)")
    _add_answer_options(s, default_k=None)
    s.set_defaults(fn=cmd_ask)

    s = sub.add_parser("demo", help="ingest the sample corpus and answer a few questions")
    s.add_argument("--memory", default=None, help="where to save the demo memory (default: a new temp folder)")
    # k=2: a 135M model reads few documents well
    _add_answer_options(s, default_k=2)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("info", help="describe a saved memory folder")
    s.add_argument("memory")
    s.set_defaults(fn=cmd_info)

    from .train_cli import add_parser as add_train_router_parser  # `msa train-router`
    add_train_router_parser(sub)
    from .train_cli import add_adapt_parser  # `msa adapt --memory M`
    add_adapt_parser(sub)
    from .eval_cli import add_parser as add_eval_parser  # `msa eval`
    add_eval_parser(sub)
    from .server import add_serve_parser  # `msa serve` (fastapi and uvicorn are imported when it starts)
    add_serve_parser(sub)
    _add_global_options_after(sub)
    return p


def _add_answer_options(s, default_k) -> None:
    from .config import MODES

    s.add_argument("--mode", default=None, choices=MODES)
    s.add_argument("-k", "--k", type=int, default=default_k,
                   help="documents to route to (per round with --rounds, unless --no-k-per-round)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--chunk-size", type=int, default=None)
    s.add_argument("--routing-chunk-size", type=int, default=None)


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # "Permission denied: mem/manifest.json"
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_global_options(args, parser)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for reports
    _log_to_stderr()
    try:
        return args.fn(args)
    except (MSAError, OSError) as e:  # ordinary mistakes: one line, no traceback
        print(f"msa: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _log_to_stderr() -> None:
    """The package's info and warnings (model conversion, documents dropped to fit the window) on stderr."""
    log = logging.getLogger("msa_plugins")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("msa: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
