"""`run_eval`: the one-call A/B run behind `msa eval`.

The SAME questions go through
- A: the RAG pipeline MSA replaces — a real LlamaIndex `VectorStoreIndex` over local all-MiniLM-L6-v2
  embeddings (`rag-minilm`) and/or BM25 (`rag-bm25`), top-k, answered through a LlamaIndex
  `RetrieverQueryEngine` whose LLM is `MSALLM` over the SAME engine's model (same weights, same k);
- B: MSA (`msa`: the default router — the shipped trained router for the embedded model; or
  `msa-training-free`: the model's own q/k projections), answering with `engine.query`; the routed
  documents are the retrieved contexts RAGAS scores.

Retrieval-only mode (recall@k, MRR; no generation) is the fast path routers are measured with.
End to end adds answer metrics, RAGAS non-LLM metrics (reference contexts = gold document texts),
latency medians / p95 (routing or retrieval, first token, total), ingest tokens/s and memory bytes.
LLM-judged metrics run only with an explicit judge.

How a run is put together (each piece below is small and named):
- `parse_systems` turns the system names into `SystemSpec`s (base system + prompt style) once;
- `EnginePool` holds one engine per MSA base system (prompt variants share it) and keeps its memory
  equal to the current evalset with as little encoding as possible (`EngineMemory.sync`);
- `BankCache` keeps encoded memories on disk across runs, keyed by the engine's fingerprint (model,
  tokenizer, weights, router, P, routing layers), the build settings, device type and dtype, and a sha256
  over the evalset's ordered documents: a second identical run loads its memories instead of encoding;
- `RagPool` holds the RAG side: the MiniLM embedder (loaded once), one index per base system and
  memory, and the ingest accounting;
- `RunPlan.build_systems(evalset)` gives the harness its `{name: function}` for one memory;
- `summarize_run` adds settings, routers and per-system ingest / latency figures to the summary.

This module uses the engine's public API only (`retrieve`, `query`, `answer_from`, `generate`, `info`,
`fingerprint`, `config`, `count_tokens`, `add` / `upsert` / `delete`, `snapshot`, `save` / `load`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from msa_plugins.config import DEFAULT_PROMPT_STYLE, AnswerOptions
from msa_plugins.errors import InvalidArgumentError

from . import metrics
from .datasets import EvalSet
from .harness import AnswerResult, Context, RunResult

logger = logging.getLogger(__name__)

# The one list of systems and datasets (the CLI's choices come from here).
SYSTEMS = ("rag-minilm", "rag-bm25", "msa", "msa-training-free", "msa-hybrid", "msa-rerank", "msa-hybrid-rerank")
DEFAULT_SYSTEMS = ("rag-minilm", "msa")
DATASETS = ("popqa", "popqa-test", "hotpotqa", "musique", "narrativeqa", "locomo", "jsonl", "niah")
_DATASET_NAMES = {"hotpotqa": "hotpotqa_train100", "musique": "musique_train100", "popqa-test": "popqa_test"}
# Prompt variants (separating retrieval from prompt): any system name + one of these suffixes answers with
# the engine's interleave prompt in that style (msa_plugins.config.PROMPT_STYLES) over the documents the
# system retrieved / routed. `rag-minilm-msaprompt`: MiniLM's top-k in MSA's prompt, generated directly
# (no LlamaIndex synthesizer); `msa-llamaprompt`: MSA's routed documents in LlamaIndex's QA prompt.
PROMPT_SUFFIXES = {"-msaprompt": "msa", "-llamaprompt": "llamaindex", "-llamauser": "llamaindex-nosystem"}
# Router argument per MSA base system: None = the engine's default router, "none" = training-free q/k.
_ROUTER_OF = {"msa": None, "msa-training-free": "none"}
# `msa-hybrid`: the `msa` engine (same memory, encoded once) routing with routing="hybrid" (router + BM25
# fused), reported as its own system beside pure MSA routing.
# `-rerank`: the same engine, each round's top RERANK_DEPTH reordered by the model's own likelihood of the
# question given each document (`retrieve(rerank=)`): still no second model, reported as its own system.
_ENGINE_OF = {"msa-hybrid": "msa", "msa-rerank": "msa", "msa-hybrid-rerank": "msa"}
_ROUTING_OF = {"msa-hybrid": "hybrid", "msa-hybrid-rerank": "hybrid"}
RERANK_DEPTH = 20
_RERANK_OF = {"msa-rerank": RERANK_DEPTH, "msa-hybrid-rerank": RERANK_DEPTH}


def split_system(name: str) -> tuple[str, str | None]:
    """'msa-llamaprompt' -> ('msa', 'llamaindex'); 'rag-minilm' -> ('rag-minilm', None).
    An unknown name raises `InvalidArgumentError` (a ValueError)."""
    name = name.replace("_", "-")
    for suffix, style in PROMPT_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in SYSTEMS:
            return name[: -len(suffix)], style
    if name in SYSTEMS:
        return name, None
    raise InvalidArgumentError(f"unknown system {name!r}; use one of {SYSTEMS}, optionally with a suffix of "
                               f"{tuple(PROMPT_SUFFIXES)}")


@dataclass(frozen=True)
class SystemSpec:
    """One system of a run: its name as reported, the base system that retrieves, and the prompt style
    (None: the base system's own answering)."""
    name: str
    base: str
    style: str | None

    @property
    def is_rag(self) -> bool:
        return self.base.startswith("rag")


def parse_systems(systems: Sequence[str]) -> list[SystemSpec]:
    """Names -> specs, duplicates dropped, order kept (the first is the report's baseline A)."""
    names = list(dict.fromkeys(s.replace("_", "-") for s in systems))
    specs, unknown = [], []
    for name in names:
        try:
            specs.append(SystemSpec(name, *split_system(name)))
        except InvalidArgumentError:
            unknown.append(name)
    if unknown or not specs:
        raise InvalidArgumentError(f"unknown systems {unknown}; use some of {SYSTEMS} (optionally with a suffix of "
                                   f"{tuple(PROMPT_SUFFIXES)})")
    return specs


# ---------------------------------------------------------------- datasets

def load_eval_memories(dataset: str, limit: int | None = None, seed: int | None = 0, distractors: int | None = None,
                       data_root=None, docs_path=None, questions_path=None, niah_sizes: Sequence[int] = (32_768,),
                       niah_samples: int = 5, niah_task: str = "single", niah_doc_tokens: int = 512,
                       tokenizer: Any = None) -> list[EvalSet]:
    """-> the memories of a dataset run (one EvalSet per memory). For NIAH, `limit` caps samples per size.
    tokenizer: a callable text -> token count (or an object with `.encode`) sizing the NIAH haystacks."""
    from . import datasets as ds

    if dataset in ("popqa", "popqa-test", "hotpotqa", "musique", "narrativeqa"):
        return [ds.load_evalset(_DATASET_NAMES.get(dataset, dataset), data_root=data_root, limit=limit, seed=seed,
                                distractors=distractors)]
    if dataset == "jsonl":
        if not (docs_path and questions_path):
            raise InvalidArgumentError("--dataset jsonl needs --docs DOCS.jsonl and --questions QUESTIONS.jsonl")
        return [ds.load_jsonl(docs_path, questions_path, limit=limit, seed=seed, distractors=distractors)]
    if dataset == "locomo":
        return _locomo_memories(ds.load_locomo(data_root=data_root), limit, seed)
    if dataset == "niah":
        from .niah import generate_niah, load_essay_sentences

        sentences = load_essay_sentences(data_root)
        samples = niah_samples if limit is None else limit
        base = 42 if seed is None else seed
        return [generate_niah(niah_task, size, niah_doc_tokens, base + s, tokenizer, data_root, essay_sentences=sentences)
                for size in niah_sizes for s in range(samples)]
    raise InvalidArgumentError(f"unknown dataset {dataset!r}; use one of {DATASETS}")


def _locomo_memories(sets: list[EvalSet], limit: int | None, seed: int | None) -> list[EvalSet]:
    """The limit counts questions over all conversations (one memory each), not per conversation."""
    from .datasets import subset

    if limit is None:
        return sets
    out, left = [], limit
    for es in sets:
        if left <= 0:
            break
        out.append(subset(es, min(left, len(es.questions)), seed))
        left -= len(out[-1].questions)
    return out


# ---------------------------------------------------------------- MSA side

@dataclass
class IngestStats:
    """What building a system's memories cost: seconds, tokens encoded or indexed, largest memory in bytes.
    Memories loaded from the bank cache count in `bank_load_s` / `bank_cache_hits`, not as encoding."""
    ingest_s: float = 0.0
    ingest_tokens: int = 0
    memory_bytes: list = field(default_factory=list)
    bank_load_s: float | None = None  # None: this system has no bank cache (RAG, or the cache is off)
    bank_cache_hits: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"ingest_s": self.ingest_s, "ingest_tokens": self.ingest_tokens,
               "ingest_tokens_per_s": self.ingest_tokens / self.ingest_s if self.ingest_s > 0 else None,
               "memory_bytes": max(self.memory_bytes) if self.memory_bytes else None}
        if self.bank_load_s is not None:
            out.update(bank_load_s=self.bank_load_s, bank_cache_hits=self.bank_cache_hits)
        return out


# ---------------------------------------------------------------- encoded-bank cache (across runs)

BANK_CACHE_FORMAT = 1
_ENTRY_FILE = "entry.json"  # written last, inside the temp folder: an entry without it is incomplete
_MEMORY_SUBDIR = "memory"
# MSAConfig settings that change what encoding stores (beyond those in the engine's fingerprint)
_BUILD_SETTINGS = ("chunk_size", "routing_layers", "score", "doc_score", "int8_routing_keys", "keep_inputs",
                   "max_doc_tokens", "split_long_documents", "batch_tokens")


def default_bank_cache_dir() -> str:
    """`$MSA_CACHE_DIR/eval-banks`, else `eval-banks` in the package's cache folder (`$MSA_PLUGINS_CACHE`,
    else `$XDG_CACHE_HOME/msa-plugins`, else `~/.cache/msa-plugins`, where the default model is converted)."""
    if os.environ.get("MSA_CACHE_DIR"):
        return os.path.join(os.environ["MSA_CACHE_DIR"], "eval-banks")
    root = os.environ.get("MSA_PLUGINS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msa-plugins")
    return os.path.join(root, "eval-banks")


def corpus_sha256(es: EvalSet) -> str:
    """sha256 over the evalset's documents in order: id, title, text (what is encoded) and metadata."""
    h = hashlib.sha256()
    for d in es.documents:
        h.update(json.dumps([d.id, d.title, d.text, d.metadata], ensure_ascii=False, sort_keys=True,
                            default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _engine_device(engine: Any) -> tuple[str | None, str | None]:
    """(device, dtype) the engine's model runs in, as strings (None when the engine does not say)."""
    model = getattr(engine, "model", None)
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    return (None if device is None else str(device)), (None if dtype is None else str(dtype))


def bank_key(engine: Any, es: EvalSet) -> dict[str, Any]:
    """Everything an encoded memory depends on: the engine's fingerprint (model name, config, tokenizer and
    weights hashes, P, routing layers, router key mode), its router, build settings, device type, dtype,
    and the corpus hash. Two runs share a cache entry only when all of these are equal."""
    config = getattr(engine, "config", None)
    device, dtype = _engine_device(engine)
    key = {"format": BANK_CACHE_FORMAT, "fingerprint": engine.fingerprint(), "router": engine.info()["router"],
           "build": {name: getattr(config, name, None) for name in _BUILD_SETTINGS},
           "device_type": None if device is None else device.split(":")[0], "dtype": dtype,
           "corpus_sha256": corpus_sha256(es), "documents": len(es.documents)}
    return json.loads(json.dumps(key, sort_keys=True, default=str))  # the form it has once read back


class BankCache:
    """Encoded memories on disk, one folder per `bank_key`: `<dir>/<sha256 of the key>/` holds `memory/`
    (a memory folder written by `engine.save`) and `entry.json` (the key). An entry is written in a temp
    folder and renamed into place, so it is complete or absent; an entry that fails to load, or loads
    something other than its evalset, is discarded with a warning and rebuilt. Never raises for a cache
    problem: the run encodes instead."""

    def __init__(self, directory: str):
        self.dir = os.path.abspath(os.path.expanduser(str(directory)))
        self.hits = 0
        self.misses = 0
        self.writable = True

    def entry_dir(self, key: dict[str, Any]) -> str:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
        return os.path.join(self.dir, digest[:32])

    def load(self, engine: Any, es: EvalSet, key: dict[str, Any]) -> bool:
        """Load the entry for `key` into `engine` and check it holds exactly `es`'s documents. False when
        there is none, or it is unusable (then removed, with a warning); the engine's memory may then be
        anything, the caller re-syncs it from scratch."""
        entry = self.entry_dir(key)
        if not os.path.exists(entry):
            return False
        try:
            with open(os.path.join(entry, _ENTRY_FILE), encoding="utf-8") as f:
                stored = json.load(f)
            if stored.get("key") != key:
                raise ValueError("its key differs from this run's (a hash collision or a hand-edited entry)")
            engine.load(os.path.join(entry, _MEMORY_SUBDIR), verify=True)  # checksums, structure, fingerprint
            problem = _memory_mismatch(engine, es)
            if problem:
                raise ValueError(problem)
            return True
        except Exception as e:  # noqa: BLE001 -- any damage means "rebuild", never a crash or a wrong bank
            logger.warning("bank cache: ignoring the damaged entry %s (%s: %s); encoding the memory again",
                           entry, type(e).__name__, " ".join(str(e).split())[:300])
            self._discard(entry)
            return False

    def store(self, engine: Any, key: dict[str, Any]) -> None:
        """Write the engine's memory as the entry for `key` (temp folder, then rename into place)."""
        if not self.writable:
            return
        entry = self.entry_dir(key)
        tmp = None
        try:
            os.makedirs(self.dir, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(entry)}-", dir=self.dir)
            engine.save(os.path.join(tmp, _MEMORY_SUBDIR))
            with open(os.path.join(tmp, _ENTRY_FILE), "w", encoding="utf-8") as f:
                json.dump({"key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=1)
            # (a damaged entry was already discarded by `load`; one present now was stored by another
            # process meanwhile, from the same inputs: keep theirs, whoever renames first wins)
            if not os.path.exists(entry):
                try:
                    os.rename(tmp, entry)
                    tmp = None
                except OSError:
                    if not os.path.isdir(entry):
                        raise
        except Exception as e:  # noqa: BLE001 -- the cache must never fail a run
            logger.warning("bank cache: could not store %s (%s: %s); later runs will encode this memory again",
                           entry, type(e).__name__, " ".join(str(e).split())[:300])
            if isinstance(e, PermissionError):
                self.writable = False
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _discard(self, entry: str) -> None:
        """Move a bad entry aside (one rename), then delete it."""
        trash = f"{entry}.trash-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(entry, trash)
        except OSError:
            trash = entry
        shutil.rmtree(trash, ignore_errors=True)

    def as_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "dir": self.dir}


def _memory_mismatch(engine: Any, es: EvalSet) -> str | None:
    """Why the engine's memory is not exactly `es`'s documents (None when it is)."""
    return _texts_mismatch(engine, dict(zip(es.doc_ids, es.memory_texts())))


def _texts_mismatch(engine: Any, want: dict[str, str]) -> str | None:
    """Why the engine's memory is not exactly `want` (id -> text; None when it is): every id present
    (a split long document by its parts' `parent_id`), and each unsplit document's text equal."""
    parents, texts = set(), {}
    for d in engine.snapshot().documents():
        parents.add(d.metadata.get("parent_id", d.id))
        texts[d.id] = d.text
    if parents != set(want):
        return f"it holds {len(parents)} documents, {len(parents ^ set(want))} of them not matching the evalset's ids"
    changed = [i for i, t in texts.items() if i in want and want[i] != t]
    if changed:
        return f"the text of {len(changed)} documents differs (first: {changed[0]!r})"
    return None


class EngineMemory:
    """One engine and the memory it currently holds; `sync(evalset)` makes the memory equal the evalset's
    documents with as little encoding as possible (loading it from the bank cache when it holds this
    evalset for this engine), and accounts ingest time / tokens."""

    def __init__(self, engine: Any, cache: BankCache | None = None, name: str = "msa"):
        self.engine = engine
        self.cache = cache
        self.name = name
        self.texts: dict[str, str] = {}
        self.ingest = IngestStats()
        if cache is not None:
            self.ingest.bank_load_s, self.ingest.bank_cache_hits = 0.0, 0

    def holds(self, es: EvalSet) -> bool:
        return self.texts == dict(zip(es.doc_ids, es.memory_texts()))

    def sync(self, es: EvalSet, progress: bool = False) -> None:
        want = dict(zip(es.doc_ids, es.memory_texts()))
        key = None
        if self.cache is not None:
            try:
                key = bank_key(self.engine, es)
            except Exception as e:  # noqa: BLE001 -- an engine that cannot say what keys its memory: no cache
                logger.warning("bank cache: off for %s (%s: %s)", self.name, type(e).__name__, e)
                self.cache = None
        if self.cache is not None:
            t0 = time.perf_counter()
            if self.cache.load(self.engine, es, key):
                dt = time.perf_counter() - t0
                self.cache.hits += 1
                self.ingest.bank_cache_hits += 1
                self.ingest.bank_load_s += dt
                self.texts = want
                self.ingest.memory_bytes.append(int(self.engine.info()["bytes"]))
                logger.info("bank cache hit: %s memory of %s (%d documents) loaded in %.2f s, nothing encoded",
                            self.name, es.name, len(want), dt)
                return
            self.cache.misses += 1
            if not self._holds_own(self.texts):  # a failed load may have left anything: start from empty
                self._clear()
            logger.info("bank cache miss: encoding the %s memory of %s (%d documents)", self.name, es.name, len(want))
        gone = [i for i in self.texts if i not in want]
        # NIAH samples of one size share their haystack documents: only changed / new ones are encoded
        encode = [i for i in want if self.texts.get(i) != want[i]]
        t0 = time.perf_counter()
        if gone:
            self.engine.delete(gone)
        if encode:
            self.engine.upsert([want[i] for i in encode], ids=encode, progress=progress)
        self.ingest.ingest_s += time.perf_counter() - t0
        if encode:
            self.ingest.ingest_tokens += sum(d.n_tokens for d in self.engine.get(encode))
        self.texts = want
        self.ingest.memory_bytes.append(int(self.engine.info()["bytes"]))
        if self.cache is not None:
            self.cache.store(self.engine, key)

    def _holds_own(self, texts: dict[str, str]) -> bool:
        """The engine's memory is exactly `texts` (what this object last put there)."""
        return _texts_mismatch(self.engine, texts) is None

    def _clear(self) -> None:
        ids = list(dict.fromkeys(d.metadata.get("parent_id", d.id) for d in self.engine.snapshot().documents()))
        if ids:
            self.engine.delete(ids, missing_ok=True, collection=None)
        self.texts = {}


class EnginePool:
    """One engine per MSA base system (`msa`, `msa-training-free`); prompt variants share their base's
    engine, so a memory is encoded once per base system."""

    def __init__(self, build_engine: Callable[[str | None], Any], cache: BankCache | None = None):
        self._build = build_engine
        self.cache = cache
        self.memories: dict[str, EngineMemory] = {}

    def get(self, base: str) -> EngineMemory:
        base = _ENGINE_OF.get(base, base)
        if base not in self.memories:
            self.memories[base] = EngineMemory(self._build(_ROUTER_OF[base]), self.cache, name=base)
        return self.memories[base]

    def generator(self, specs: Sequence[SystemSpec]) -> Any:
        """The generator the RAG side answers with: the same model as MSA — the `msa` engine when it runs,
        else the first MSA variant's, else a bare engine of the same model (its memory stays empty)."""
        msa_bases = sorted({s.base for s in specs if not s.is_rag}, key=lambda base: base != "msa")
        return self.get(msa_bases[0]).engine if msa_bases else self._build("none")

    def routers(self) -> dict[str, Any]:
        return {base: em.engine.info()["router"] for base, em in self.memories.items()}


def msa_system_fn(em: EngineMemory, spec: SystemSpec, plan: "RunPlan") -> Callable:
    from .msa_system import msa_answer_fn, msa_retrieve_fn

    routing = _ROUTING_OF.get(spec.base)  # None: the engine's default (pure MSA routing)
    rerank = _RERANK_OF.get(spec.base, 0)
    # with rounds > 1 both paths split the same k over the rounds: recall over all of them, and answers from
    # k documents in all, the k the RAG side retrieves
    if plan.retrieval_only:
        return msa_retrieve_fn(em.engine, routing=routing, rounds=plan.rounds, rerank=rerank)
    style = {"prompt_style": spec.style} if spec.style else {}
    return msa_answer_fn(em.engine, mode=plan.mode, k=plan.k, rounds=plan.rounds, k_per_round=False,
                         routing=routing, rerank=rerank, max_new_tokens=plan.max_new_tokens, temperature=0.0,
                         **style)


# ---------------------------------------------------------------- RAG side

def recording_llm(engine: Any, **fields) -> Any:
    """`MSALLM` over `engine` that keeps the `raw` of its last chat response (the generator's timings and
    usage): LlamaIndex's synthesizer does not surface the LLM's response, so this is how the RAG side gets
    its generator's prefill and first-token times. `llm.last_raw` (None before a call), `llm.reset()`."""
    from llama_index.core.llms import ChatResponse
    from pydantic import PrivateAttr

    from msa_plugins.integrations.llama_index import MSALLM

    class RecordingMSALLM(MSALLM):
        _last_raw: Any = PrivateAttr(default=None)

        @property
        def last_raw(self):
            return self._last_raw

        def reset(self) -> None:
            self._last_raw = None

        def chat(self, messages, **kwargs) -> ChatResponse:  # complete() is derived from chat()
            response = super().chat(messages, **kwargs)
            self._last_raw = response.raw
            return response

    return RecordingMSALLM(engine=engine, **fields)


class RagPool:
    """The RAG side of a run: the MiniLM embedder (loaded once, on first use), one index per base RAG
    system and memory, and each reported system's ingest accounting."""

    def __init__(self, count_tokens: Callable[[str], int]):
        self.count_tokens = count_tokens
        self.stats: dict[str, IngestStats] = {}
        self._embed = None

    def embedder(self):
        if self._embed is None:
            from .baselines import MiniLMEmbedding

            self._embed = MiniLMEmbedding()
        return self._embed

    def indexes(self, es: EvalSet, bases: set[str]) -> dict[str, tuple[Any, int | None]]:
        """base -> (retriever, vector bytes or None) over this memory."""
        from .baselines import BM25RAG, VectorRAG

        out = {}
        for base in sorted(bases):
            if base == "rag-minilm":
                rag = VectorRAG(es, embed_model=self.embedder())
                dim = len(self.embedder().get_query_embedding("x"))
                out[base] = (rag, len(es.documents) * dim * 4)  # float32 vectors
            else:
                out[base] = (BM25RAG(es), None)
        return out

    def account(self, name: str, es: EvalSet, rag: Any, vector_bytes: int | None, memory_tokens: int) -> None:
        st = self.stats.setdefault(name, IngestStats())
        st.ingest_s += rag.index_seconds
        st.ingest_tokens += memory_tokens
        st.memory_bytes.append((vector_bytes or 0) + sum(len(t.encode()) for t in es.memory_texts()))


def timed_rag_answer_fn(answer_fn: Callable, llm: Any) -> Callable:
    """RAG timings in MSA's names: routing_s = retrieval, first_token_s = retrieval + generator prefill
    and first token, total_s; token counts from the generator's own result (`llm.last_raw`)."""

    def answer(question: str):
        llm.reset()
        res = answer_fn(question)
        t = dict(res.timings)
        t["routing_s"] = t.get("retrieve_s", 0.0)
        raw = llm.last_raw
        if raw:
            gen = raw["timings"]
            t["first_token_s"] = t["routing_s"] + gen.get("first_token_s", 0.0)
            t["prefill_s"] = gen.get("prefill_s")
            t["decode_s"] = gen.get("decode_s")
            res.tokens["prompt_tokens"] = raw["usage"]["prompt_tokens"]
            res.tokens["completion_tokens"] = raw["usage"]["completion_tokens"]
        res.timings = t
        return res

    return answer


def rag_prompt_answer_fn(rag: Any, es: EvalSet, engine: Any, style: str, k: int, max_new_tokens: int) -> Callable:
    """A RAG retriever's top-k documents answered with the engine's interleave prompt in `style` (what
    MSA's generator would read had it routed these documents), greedy, without LlamaIndex's synthesizer."""
    texts = dict(zip(es.doc_ids, es.memory_texts()))

    def answer(question: str) -> AnswerResult:
        t0 = time.perf_counter()
        hits = rag.retrieve(question, k)
        retrieve_s = time.perf_counter() - t0
        contexts = [Context(str(i), texts[str(i)], float(sc)) for i, sc in hits]
        res = engine.answer_from(question, [c.text for c in contexts], max_new_tokens=max_new_tokens,
                                 temperature=0.0, prompt_style=style).collect()
        total_s = time.perf_counter() - t0
        timings = {"retrieve_s": retrieve_s, "routing_s": retrieve_s, "prefill_s": res.timings.get("prefill_s"),
                   "decode_s": res.timings.get("decode_s"),
                   "first_token_s": retrieve_s + res.timings.get("first_token_s", 0.0), "total_s": total_s}
        tokens = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                  "context_chars": sum(len(c.text) for c in contexts), "answer_chars": len(res.answer)}
        return AnswerResult(res.answer, contexts, timings, tokens)

    return answer


# ---------------------------------------------------------------- the plan

@dataclass
class RunPlan:
    """Everything a run needs to build its systems for one memory (`build_systems`)."""
    specs: list[SystemSpec]
    engines: EnginePool
    generator: Any  # the engine whose model answers on the RAG side
    rags: RagPool
    retrieval_only: bool
    mode: str | None
    k: int
    rounds: int
    max_new_tokens: int
    progress: bool = True
    llm: Any = None  # the RAG side's LlamaIndex LLM: MSALLM over `generator`, recording its last result

    @classmethod
    def create(cls, specs: list[SystemSpec], build_engine: Callable[[str | None], Any], *, retrieval_only: bool,
               mode: str | None, k: int, rounds: int, max_new_tokens: int, progress: bool,
               bank_cache: BankCache | None = None) -> "RunPlan":
        engines = EnginePool(build_engine, bank_cache)
        generator = engines.generator(specs)
        plan = cls(specs, engines, generator, RagPool(generator.count_tokens), retrieval_only, mode, k, rounds,
                   max_new_tokens, progress)
        if not retrieval_only and any(s.is_rag and s.style is None for s in specs):
            plan.llm = recording_llm(generator, max_new_tokens=max_new_tokens, temperature=0.0)
        return plan

    def build_systems(self, es: EvalSet) -> dict[str, Callable]:
        """{name: retrieve or answer function} over this memory, in the order the systems were given."""
        rag_specs = [s for s in self.specs if s.is_rag]
        indexes = self.rags.indexes(es, {s.base for s in rag_specs}) if rag_specs else {}
        memory_tokens = sum(self.rags.count_tokens(t) for t in es.memory_texts()) if rag_specs else 0
        fns: dict[str, Callable] = {}
        for spec in self.specs:
            if spec.is_rag:
                rag, vector_bytes = indexes[spec.base]
                self.rags.account(spec.name, es, rag, vector_bytes, memory_tokens)
                fns[spec.name] = self._rag_fn(spec, rag, es)
            else:
                em = self.engines.get(spec.base)
                if not em.holds(es):
                    em.sync(es, progress=self.progress)
                fns[spec.name] = msa_system_fn(em, spec, self)
        return fns

    def _rag_fn(self, spec: SystemSpec, rag: Any, es: EvalSet) -> Callable:
        from .baselines import make_rag_answer_fn

        if self.retrieval_only:
            return rag.retrieve
        if spec.style is not None:
            return rag_prompt_answer_fn(rag, es, self.generator, spec.style, self.k, self.max_new_tokens)
        answer = make_rag_answer_fn(rag, self.llm, k=self.k, count_tokens=self.rags.count_tokens)
        return timed_rag_answer_fn(answer, self.llm)

    def system_stats(self, spec: SystemSpec) -> dict[str, Any]:
        if spec.is_rag:
            return self.rags.stats[spec.name].as_dict() if spec.name in self.rags.stats else {}
        engine_base = _ENGINE_OF.get(spec.base, spec.base)
        return self.engines.get(spec.base).ingest.as_dict() if engine_base in self.engines.memories else {}


def latency_extras(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """Median / p95 of routing (or retrieval), first token and total, over a system's answered questions."""
    own = [r for r in records if r["system"] == name and "error" not in r]
    out: dict[str, Any] = {}
    for key in ("routing_s", "first_token_s", "total_s"):
        values = [r["timings"][key] for r in own if r.get("timings", {}).get(key) is not None]
        if values:
            lat = metrics.latency_summary(values)
            out[f"{key[:-2]} median_s"] = lat.get("median_s")
            out[f"{key[:-2]} p95_s"] = lat.get("p95_s")
    return out


def machine_load() -> list[float] | None:
    """The 1/5/15-minute load averages now (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(load_avg_start: list[float] | None, device: str | None) -> dict[str, Any]:
    """What the timings were measured on: CPUs, load at start and end, torch's thread count, device."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = None
    return {"cpu_count": os.cpu_count(), "load_avg_start": load_avg_start, "load_avg_end": machine_load(),
            "torch_threads": threads, "device": device, "platform": platform.platform()}


def summarize_run(result: RunResult, plan: RunPlan, dataset: str, wall_s: float, settings: dict) -> None:
    """Add the run's settings, routers, bank cache counts and per-system ingest / latency figures to
    `result.summary`."""
    defaults = plan.generator.answer_defaults
    cache = plan.engines.cache
    result.summary.update(
        dataset=dataset, wall_s=wall_s,
        settings={**settings, "mode": plan.mode or defaults.mode,
                  "prompt_style": defaults.prompt_style or DEFAULT_PROMPT_STYLE,
                  "model": plan.generator.model_name},
        routers=plan.engines.routers(),
        bank_cache=cache.as_dict() if cache is not None else {"hits": 0, "misses": 0, "dir": None})
    for spec in plan.specs:
        entry = result.summary["systems"].get(spec.name)
        if entry is not None:
            entry["extra"] = {**plan.system_stats(spec), **latency_extras(result.records, spec.name)}


def make_judge(base_url: str | None, model: str | None, api_key: str | None):
    if not (base_url or model):
        return None
    if not (base_url and model):
        raise InvalidArgumentError("a judge needs both --judge-base-url and --judge-model")
    return metrics.Judge(base_url=base_url, model=model, api_key=api_key)


# ---------------------------------------------------------------- the run

def run_eval(
    dataset: str = "popqa",
    limit: int | None = None,
    seed: int | None = 0,
    distractors: int | None = None,
    retrieval_only: bool = False,
    systems: Sequence[str] = DEFAULT_SYSTEMS,
    mode: str | None = None,
    k: int = 3,
    rounds: int = 1,
    max_new_tokens: int = 24,
    out_dir: str | None = None,
    niah_sizes: Sequence[int] = (32_768,),
    niah_samples: int = 5,
    niah_task: str = "single",
    model: str | None = None,
    router: str | None = None,
    device: str | None = None,
    data_root=None,
    docs_path=None,
    questions_path=None,
    judge_base_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key: str | None = None,
    ragas_metrics: bool = True,
    ks: Sequence[int] | None = None,
    engine_factory: Callable[[str | None], Any] | None = None,
    command: str | None = None,
    progress: bool = True,
    memories: list[EvalSet] | None = None,
    bank_cache: str | os.PathLike | bool | None = None,
    routing_chunk_size: int | None = None,
) -> RunResult:
    """Run the A/B evaluation; returns the harness RunResult (records, summary, out_dir).

    rounds: MSA interleave routing rounds (multi-hop); the k routed documents are split over them (k=5 in
    2 rounds: 3 + 2), so MSA answers from the same k documents the RAG side retrieves once.
    systems: any of rag-minilm, rag-bm25, msa, msa-training-free; the first is the baseline A of the
    report's ratio columns. engine_factory(router) -> MSAEngine overrides how engines are built
    (router is None for `msa`, "none" for `msa-training-free`). memories: pre-built EvalSets instead of
    loading `dataset` (tests, custom runs). data_root: the datasets folder (default $MSA_DATASETS, else
    ../shared/datasets relative to the current directory). device: None = the engine's default (CUDA when
    available, else CPU; $MSA_DEVICE). bank_cache: a folder keeping encoded MSA memories across runs (True:
    `default_bank_cache_dir()`; None / False: encode every memory, the default for this Python API; `msa eval`
    turns it on). summary["bank_cache"] counts hits and misses; summary["machine"] records the load.
    routing_chunk_size: tokens per routing key of the MSA memories (None: the engine's default).
    """
    from .harness import run_ab_eval, run_retrieval_eval

    load_avg_start = machine_load()
    specs = parse_systems(systems)
    if not retrieval_only:  # the MSA answer options (sparse mode routes once: no rounds, no rerank), before any encoding
        for rerank in {_RERANK_OF.get(s.base, 0) for s in specs if not s.is_rag} or {0}:
            AnswerOptions().merged(mode=mode, k=k, rounds=rounds, max_new_tokens=max_new_tokens, rerank=rerank)
    judge = make_judge(judge_base_url, judge_model, judge_api_key)
    if bank_cache is True:
        bank_cache = default_bank_cache_dir()
    if dataset == "niah" and bank_cache not in (None, False, ""):
        # every NIAH sample is its own memory that differs from the others only in its needle documents: they
        # are re-encoded incrementally in one run; storing each sample's whole memory would fill the disk
        logger.info("bank cache: not used for NIAH (samples share their haystack within a run)")
        bank_cache = None
    cache = BankCache(bank_cache) if bank_cache not in (None, False, "") else None
    # End to end a system returns exactly k contexts, so recall@k' for k' > k would only repeat recall@k.
    ks = sorted(set(ks or ((1, k, 5, 10) if retrieval_only else (1, k))))

    def build_engine(r: str | None) -> Any:
        r = router if r is None else r  # `msa` routes with the given router (None: the engine's default)
        if engine_factory is not None:
            return engine_factory(r)
        from msa_plugins import MSAEngine

        extra = {} if routing_chunk_size is None else {"routing_chunk_size": routing_chunk_size}
        return MSAEngine.from_pretrained(model=model, router=r, device=device, keep_inputs=False, **extra)

    plan = RunPlan.create(specs, build_engine, retrieval_only=retrieval_only, mode=mode, k=k, rounds=rounds,
                          max_new_tokens=max_new_tokens, progress=progress, bank_cache=cache)
    if memories is None:
        memories = load_eval_memories(dataset, limit=limit, seed=seed, distractors=distractors, data_root=data_root,
                                      docs_path=docs_path, questions_path=questions_path, niah_sizes=niah_sizes,
                                      niah_samples=niah_samples, niah_task=niah_task,
                                      tokenizer=plan.generator.count_tokens)
    t0 = time.perf_counter()
    if retrieval_only:
        result = run_retrieval_eval(memories, plan.build_systems, ks=ks, out_dir=None, progress=progress)
    else:
        result = run_ab_eval(memories, plan.build_systems, ks=ks, ragas_metrics=ragas_metrics, judge=judge,
                             out_dir=None, progress=progress)
    settings = {"limit": limit, "seed": seed, "distractors": distractors, "systems": [s.name for s in specs],
                "k": k, "rounds": rounds, "max_new_tokens": max_new_tokens, "retrieval_only": retrieval_only,
                "routing_chunk_size": getattr(getattr(plan.generator, "config", None), "key_chunk_size", None),
                "device": _engine_device(plan.generator)[0] or device, "niah_sizes": list(niah_sizes) if dataset == "niah" else None,
                "niah_task": niah_task if dataset == "niah" else None, "judge": judge_model}
    summarize_run(result, plan, dataset, time.perf_counter() - t0, settings)
    result.summary["machine"] = machine_info(load_avg_start, settings["device"])
    if out_dir is not None:
        from . import report

        result.out_dir = str(report.write_report(out_dir, result.records, result.summary, command=command))
    return result
