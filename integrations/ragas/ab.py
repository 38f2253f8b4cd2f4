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
- `RagPool` holds the RAG side: the MiniLM embedder (loaded once), one index per base system and
  memory, and the ingest accounting;
- `RunPlan.build_systems(evalset)` gives the harness its `{name: function}` for one memory;
- `summarize_run` adds settings, routers and per-system ingest / latency figures to the summary.

This module uses the engine's public API only (`retrieve`, `query`, `answer_from`, `generate`, `info`,
`count_tokens`, `add` / `upsert` / `delete`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from msa_plugins.config import DEFAULT_PROMPT_STYLE
from msa_plugins.errors import InvalidArgumentError

from . import metrics
from .datasets import EvalSet
from .harness import AnswerResult, Context, RunResult

# The one list of systems and datasets (the CLI's choices come from here).
SYSTEMS = ("rag-minilm", "rag-bm25", "msa", "msa-training-free", "msa-hybrid")
DEFAULT_SYSTEMS = ("rag-minilm", "msa")
DATASETS = ("popqa", "hotpotqa", "musique", "narrativeqa", "locomo", "jsonl", "niah")
_DATASET_NAMES = {"hotpotqa": "hotpotqa_train100", "musique": "musique_train100"}
# Prompt variants (separating retrieval from prompt): any system name + one of these suffixes answers with
# the engine's interleave prompt in that style (msa_plugins.config.PROMPT_STYLES) over the documents the
# system retrieved / routed. `rag-minilm-msaprompt`: MiniLM's top-k in MSA's prompt, generated directly
# (no LlamaIndex synthesizer); `msa-llamaprompt`: MSA's routed documents in LlamaIndex's QA prompt.
PROMPT_SUFFIXES = {"-msaprompt": "msa", "-llamaprompt": "llamaindex", "-llamauser": "llamaindex-nosystem"}
# Router argument per MSA base system: None = the engine's default router, "none" = training-free q/k.
_ROUTER_OF = {"msa": None, "msa-training-free": "none"}
# `msa-hybrid`: the `msa` engine (same memory, encoded once) routing with routing="hybrid" (router + BM25
# fused), reported as its own system beside pure MSA routing.
_ENGINE_OF = {"msa-hybrid": "msa"}
_ROUTING_OF = {"msa-hybrid": "hybrid"}


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

    if dataset in ("popqa", "hotpotqa", "musique", "narrativeqa"):
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
    """What building a system's memories cost: seconds, tokens encoded or indexed, largest memory in bytes."""
    ingest_s: float = 0.0
    ingest_tokens: int = 0
    memory_bytes: list = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ingest_s": self.ingest_s, "ingest_tokens": self.ingest_tokens,
                "ingest_tokens_per_s": self.ingest_tokens / self.ingest_s if self.ingest_s > 0 else None,
                "memory_bytes": max(self.memory_bytes) if self.memory_bytes else None}


class EngineMemory:
    """One engine and the memory it currently holds; `sync(evalset)` makes the memory equal the evalset's
    documents with as little encoding as possible, and accounts ingest time / tokens."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.texts: dict[str, str] = {}
        self.ingest = IngestStats()

    def holds(self, es: EvalSet) -> bool:
        return self.texts == dict(zip(es.doc_ids, es.memory_texts()))

    def sync(self, es: EvalSet, progress: bool = False) -> None:
        want = dict(zip(es.doc_ids, es.memory_texts()))
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


class EnginePool:
    """One engine per MSA base system (`msa`, `msa-training-free`); prompt variants share their base's
    engine, so a memory is encoded once per base system."""

    def __init__(self, build_engine: Callable[[str | None], Any]):
        self._build = build_engine
        self.memories: dict[str, EngineMemory] = {}

    def get(self, base: str) -> EngineMemory:
        base = _ENGINE_OF.get(base, base)
        if base not in self.memories:
            self.memories[base] = EngineMemory(self._build(_ROUTER_OF[base]))
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
    if plan.retrieval_only:  # with rounds > 1: the same k split over the rounds, recall over all of them
        return msa_retrieve_fn(em.engine, routing=routing, rounds=plan.rounds)
    style = {"prompt_style": spec.style} if spec.style else {}
    return msa_answer_fn(em.engine, mode=plan.mode, k=plan.k, rounds=plan.rounds, routing=routing,
                         max_new_tokens=plan.max_new_tokens, temperature=0.0, **style)


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
               mode: str | None, k: int, rounds: int, max_new_tokens: int, progress: bool) -> "RunPlan":
        engines = EnginePool(build_engine)
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


def summarize_run(result: RunResult, plan: RunPlan, dataset: str, wall_s: float, settings: dict) -> None:
    """Add the run's settings, routers and per-system ingest / latency figures to `result.summary`."""
    defaults = plan.generator.answer_defaults
    result.summary.update(
        dataset=dataset, wall_s=wall_s,
        settings={**settings, "mode": plan.mode or defaults.mode,
                  "prompt_style": defaults.prompt_style or DEFAULT_PROMPT_STYLE,
                  "model": plan.generator.model_name},
        routers=plan.engines.routers())
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
    device: str | None = "cpu",
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
) -> RunResult:
    """Run the A/B evaluation; returns the harness RunResult (records, summary, out_dir).

    rounds: MSA interleave routing rounds; 1 (default) = exactly k routed documents, the same k the RAG
    side retrieves (more rounds add up to k documents each, a bigger context than RAG's).
    systems: any of rag-minilm, rag-bm25, msa, msa-training-free; the first is the baseline A of the
    report's ratio columns. engine_factory(router) -> MSAEngine overrides how engines are built
    (router is None for `msa`, "none" for `msa-training-free`). memories: pre-built EvalSets instead of
    loading `dataset` (tests, custom runs). data_root: the datasets folder (default $MSA_DATASETS, else
    ../shared/datasets relative to the current directory).
    """
    from .harness import run_ab_eval, run_retrieval_eval

    specs = parse_systems(systems)
    judge = make_judge(judge_base_url, judge_model, judge_api_key)
    # End to end a system returns exactly k contexts, so recall@k' for k' > k would only repeat recall@k.
    ks = sorted(set(ks or ((1, k, 5, 10) if retrieval_only else (1, k))))

    def build_engine(r: str | None) -> Any:
        r = router if r is None else r  # `msa` routes with the given router (None: the engine's default)
        if engine_factory is not None:
            return engine_factory(r)
        from msa_plugins import MSAEngine

        return MSAEngine.from_pretrained(model=model, router=r, device=device, keep_inputs=False)

    plan = RunPlan.create(specs, build_engine, retrieval_only=retrieval_only, mode=mode, k=k, rounds=rounds,
                          max_new_tokens=max_new_tokens, progress=progress)
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
                "device": device, "niah_sizes": list(niah_sizes) if dataset == "niah" else None,
                "niah_task": niah_task if dataset == "niah" else None, "judge": judge_model}
    summarize_run(result, plan, dataset, time.perf_counter() - t0, settings)
    if out_dir is not None:
        from . import report

        result.out_dir = str(report.write_report(out_dir, result.records, result.summary, command=command))
    return result
