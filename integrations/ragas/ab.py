"""`run_eval`: the one-call A/B run behind `msa eval` (issue 3).

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

Each MSA variant owns one engine; its memory is encoded once per memory (per dataset run; NIAH samples
of the same size share the unchanged haystack documents, so only the needle documents are re-encoded).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

from . import metrics
from .datasets import EvalSet

SYSTEMS = ("rag-minilm", "rag-bm25", "msa", "msa-training-free")
DEFAULT_SYSTEMS = ("rag-minilm", "msa")
# Prompt variants (separating retrieval from prompt): any system name + one of these suffixes answers with
# the engine's interleave prompt in that style (engine.generation.PROMPT_STYLES) over the documents the
# system retrieved / routed. `rag-minilm-msaprompt`: MiniLM's top-k in MSA's prompt, generated directly
# (no LlamaIndex synthesizer); `msa-llamaprompt`: MSA's routed documents in LlamaIndex's QA prompt.
PROMPT_SUFFIXES = {"-msaprompt": "msa", "-llamaprompt": "llamaindex", "-llamauser": "llamaindex-nosystem"}


def split_system(name: str) -> tuple[str, str | None]:
    """'msa-llamaprompt' -> ('msa', 'llamaindex'); 'rag-minilm' -> ('rag-minilm', None). ValueError if unknown."""
    name = name.replace("_", "-")
    for suffix, style in PROMPT_SUFFIXES.items():
        if name.endswith(suffix) and name[: -len(suffix)] in SYSTEMS:
            return name[: -len(suffix)], style
    if name in SYSTEMS:
        return name, None
    raise ValueError(f"unknown system {name!r}; use one of {SYSTEMS}, optionally with a suffix of "
                     f"{tuple(PROMPT_SUFFIXES)}")
DATASETS = ("popqa", "hotpotqa", "musique", "narrativeqa", "locomo", "jsonl", "niah")
_DATASET_NAMES = {"hotpotqa": "hotpotqa_train100", "musique": "musique_train100"}


# ---------------------------------------------------------------- datasets

def load_eval_memories(dataset: str, limit: int | None = None, seed: int | None = 0, distractors: int | None = None,
                       data_root=None, docs_path=None, questions_path=None, niah_sizes: Sequence[int] = (32_768,),
                       niah_samples: int = 5, niah_task: str = "single", niah_doc_tokens: int = 512,
                       tokenizer: Any = None) -> list[EvalSet]:
    """-> the memories of a dataset run (one EvalSet per memory). For NIAH, `limit` caps samples per size."""
    from . import datasets as ds

    if dataset in ("popqa", "hotpotqa", "musique", "narrativeqa"):
        return [ds.load_evalset(_DATASET_NAMES.get(dataset, dataset), data_root=data_root, limit=limit, seed=seed,
                                distractors=distractors)]
    if dataset == "jsonl":
        if not (docs_path and questions_path):
            raise ValueError("--dataset jsonl needs --docs DOCS.jsonl and --questions QUESTIONS.jsonl")
        return [ds.load_jsonl(docs_path, questions_path, limit=limit, seed=seed, distractors=distractors)]
    if dataset == "locomo":
        sets = ds.load_locomo(data_root=data_root)
        sets = sets if isinstance(sets, list) else [sets]
        if limit is not None:  # the limit counts questions over all conversations
            out, left = [], limit
            for es in sets:
                if left <= 0:
                    break
                out.append(ds.subset(es, min(left, len(es.questions)), seed))
                left -= len(out[-1].questions)
            sets = out
        return sets
    if dataset == "niah":
        from .niah import generate_niah, load_essay_sentences

        sentences = load_essay_sentences(data_root)
        samples = niah_samples if limit is None else limit
        base = 42 if seed is None else seed
        return [generate_niah(niah_task, size, niah_doc_tokens, base + s, tokenizer, data_root, essay_sentences=sentences)
                for size in niah_sizes for s in range(samples)]
    raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}")


# ---------------------------------------------------------------- MSA side

class EngineMemory:
    """One engine and the memory it currently holds; `sync(evalset)` makes the memory equal the evalset's
    documents with as little encoding as possible, and accounts ingest time / tokens."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.texts: dict[str, str] = {}
        self.ingest_s = 0.0
        self.ingest_tokens = 0
        self.memory_bytes: list[int] = []

    def sync(self, es: EvalSet, progress: bool = False) -> None:
        want = dict(zip(es.doc_ids, es.memory_texts()))
        gone = [i for i in self.texts if i not in want]
        changed = [i for i in want if i in self.texts and self.texts[i] != want[i]]
        new = [i for i in want if i not in self.texts]
        t0 = time.perf_counter()
        if gone:
            self.engine.delete(gone)
        if changed:
            self.engine.replace([want[i] for i in changed], ids=changed, progress=progress)
        if new:
            self.engine.add([want[i] for i in new], ids=new, progress=progress)
        self.ingest_s += time.perf_counter() - t0
        encoded = changed + new
        if encoded:
            self.ingest_tokens += sum(d.n_tokens for d in self.engine.get(encoded))
        self.texts = want
        self.memory_bytes.append(int(self.engine.memory.nbytes))

    def stats(self) -> dict[str, Any]:
        return {"ingest_s": self.ingest_s, "ingest_tokens": self.ingest_tokens,
                "ingest_tokens_per_s": self.ingest_tokens / self.ingest_s if self.ingest_s > 0 else None,
                "memory_bytes": max(self.memory_bytes) if self.memory_bytes else None}


class _RecordingEngine:
    """The engine as MSALLM sees it, remembering the last generation's timings (for RAG first-token)."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.last = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        self.last = self._engine.generate(*args, **kwargs)
        return self.last


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
):
    """Run the A/B evaluation; returns the harness RunResult (records, summary, out_dir).

    rounds: MSA interleave routing rounds; 1 (default) = exactly k routed documents, the same k the RAG
    side retrieves (more rounds add up to k documents each, a bigger context than RAG's).
    systems: any of rag-minilm, rag-bm25, msa, msa-training-free; the first is the baseline A of the
    report's ratio columns. engine_factory(router) -> MSAEngine overrides how engines are built
    (router is None for `msa`, "none" for `msa-training-free`). memories: pre-built EvalSets instead of
    loading `dataset` (tests, custom runs).
    """
    from .harness import run_ab_eval, run_retrieval_eval

    systems = list(dict.fromkeys(s.replace("_", "-") for s in systems))
    unknown = []
    for s_ in systems:
        try:
            split_system(s_)
        except ValueError:
            unknown.append(s_)
    if unknown or not systems:
        raise ValueError(f"unknown systems {unknown}; use some of {SYSTEMS} (optionally with a suffix of "
                         f"{tuple(PROMPT_SUFFIXES)})")
    base_of = {s_: split_system(s_)[0] for s_ in systems}
    style_of = {s_: split_system(s_)[1] for s_ in systems}
    # End to end a system returns exactly k contexts, so recall@k' for k' > k would only repeat recall@k.
    ks = sorted(set(ks or ((1, k, 5, 10) if retrieval_only else (1, k))))

    def build_engine(r):
        if engine_factory is not None:
            return engine_factory(r)
        from msa_plugins import MSAEngine

        return MSAEngine.from_pretrained(model=model, router=r, device=device, keep_inputs=False)

    engines: dict[str, EngineMemory] = {}  # by base system: prompt variants of one MSA system share its engine

    def engine_for(name: str) -> EngineMemory:
        base = base_of.get(name, name)
        if base not in engines:
            engines[base] = EngineMemory(build_engine(router if base == "msa" else "none"))
        return engines[base]

    # The generator (RAG side): the same model as MSA — the `msa` engine when it runs, else the first MSA
    # variant's, else a bare engine of the same model (its memory stays empty).
    msa_names = sorted((s_ for s_ in systems if base_of[s_].startswith("msa")), key=lambda s_: base_of[s_] != "msa")
    gen_engine = engine_for(msa_names[0]).engine if msa_names else build_engine("none")
    tokenizer = gen_engine.model.tokenizer

    if memories is None:
        memories = load_eval_memories(dataset, limit=limit, seed=seed, distractors=distractors, data_root=data_root,
                                      docs_path=docs_path, questions_path=questions_path, niah_sizes=niah_sizes,
                                      niah_samples=niah_samples, niah_task=niah_task, tokenizer=tokenizer)

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    rag_stats: dict[str, dict[str, Any]] = {s: {"ingest_s": 0.0, "ingest_tokens": 0, "memory_bytes": []}
                                           for s in systems if s.startswith("rag")}
    llm = None
    recorder = None
    if not retrieval_only and any(s_.startswith("rag") and style_of[s_] is None for s_ in systems):
        from msa_plugins.integrations.llama_index import MSALLM

        recorder = _RecordingEngine(gen_engine)
        llm = MSALLM(engine=recorder, max_new_tokens=max_new_tokens, temperature=0.0)

    def build_systems(es: EvalSet) -> dict[str, Callable]:
        from .baselines import BM25RAG, MiniLMEmbedding, VectorRAG, make_rag_answer_fn
        from .msa_system import msa_answer_fn, msa_retrieve_fn

        fns: dict[str, Callable] = {}
        mem_tokens = None
        rags: dict[str, tuple] = {}  # one index per base RAG system and memory
        for name in systems:
            base, style = base_of[name], style_of[name]
            if name.startswith("rag"):
                if base in rags:
                    rag, vec_bytes = rags[base]
                elif base == "rag-minilm":
                    if "embed" not in build_systems.__dict__:
                        build_systems.embed = MiniLMEmbedding()
                    rag = VectorRAG(es, embed_model=build_systems.embed)
                    dim = len(build_systems.embed.get_query_embedding("x"))
                    vec_bytes = len(es.documents) * dim * 4
                else:
                    rag = BM25RAG(es)
                    vec_bytes = None
                rags[base] = (rag, vec_bytes)
                if mem_tokens is None:
                    mem_tokens = sum(count_tokens(t) for t in es.memory_texts())
                st = rag_stats[name]
                st["ingest_s"] += rag.index_seconds
                st["ingest_tokens"] += mem_tokens
                st["memory_bytes"].append((vec_bytes or 0) + sum(len(t.encode()) for t in es.memory_texts()))
                if retrieval_only:
                    fns[name] = rag.retrieve
                elif style is not None:
                    fns[name] = _rag_prompt_answer(rag, es, gen_engine, style, k, max_new_tokens)
                else:
                    fns[name] = _timed_rag_answer(make_rag_answer_fn(rag, llm, k=k, count_tokens=count_tokens),
                                                  recorder)
            else:
                em = engine_for(name)
                if em.texts != dict(zip(es.doc_ids, es.memory_texts())):
                    em.sync(es, progress=progress)
                if retrieval_only:
                    fns[name] = msa_retrieve_fn(em.engine)
                else:
                    fns[name] = msa_answer_fn(em.engine, mode=mode, k=k, rounds=rounds,
                                              max_new_tokens=max_new_tokens, temperature=0.0,
                                              **({"prompt_style": style} if style else {}))
        return fns

    judge = None
    if judge_base_url or judge_model:
        if not (judge_base_url and judge_model):
            raise ValueError("a judge needs both --judge-base-url and --judge-model")
        judge = metrics.Judge(base_url=judge_base_url, model=judge_model, api_key=judge_api_key)

    t0 = time.perf_counter()
    if retrieval_only:
        result = run_retrieval_eval(memories, build_systems, ks=ks, out_dir=None, progress=progress)
    else:
        result = run_ab_eval(memories, build_systems, ks=ks, ragas_metrics=ragas_metrics, judge=judge,
                             out_dir=None, progress=progress)
    wall = time.perf_counter() - t0

    summary = result.summary
    from msa_plugins.engine.generation import DEFAULT_PROMPT_STYLE

    summary.update(dataset=dataset, wall_s=wall,
                   settings={"limit": limit, "seed": seed, "distractors": distractors, "systems": systems,
                             "mode": mode or gen_engine.config.mode,
                             "prompt_style": gen_engine.config.prompt_style or DEFAULT_PROMPT_STYLE, "k": k, "rounds": rounds, "max_new_tokens": max_new_tokens,
                             "retrieval_only": retrieval_only, "model": gen_engine.name, "device": device,
                             "niah_sizes": list(niah_sizes) if dataset == "niah" else None,
                             "niah_task": niah_task if dataset == "niah" else None,
                             "judge": judge_model},
                   routers={name: em.engine.router.fingerprint() for name, em in engines.items()})
    for name, entry in summary["systems"].items():
        extra: dict[str, Any] = {}
        if base_of.get(name, name) in engines:
            extra.update(engines[base_of.get(name, name)].stats())
        elif name in rag_stats:
            st = rag_stats[name]
            extra.update(ingest_s=st["ingest_s"], ingest_tokens=st["ingest_tokens"],
                         ingest_tokens_per_s=st["ingest_tokens"] / st["ingest_s"] if st["ingest_s"] > 0 else None,
                         memory_bytes=max(st["memory_bytes"]) if st["memory_bytes"] else None)
        own = [r for r in result.records if r["system"] == name and "error" not in r]
        for key in ("routing_s", "first_token_s", "total_s"):
            values = [r["timings"][key] for r in own if r.get("timings", {}).get(key) is not None]
            if values:
                lat = metrics.latency_summary(values)
                extra[f"{key[:-2]} median_s"] = lat.get("median_s")
                extra[f"{key[:-2]} p95_s"] = lat.get("p95_s")
        entry["extra"] = extra
    if out_dir is not None:
        from . import report

        result.out_dir = str(report.write_report(out_dir, result.records, summary, command=command))
    return result


def _timed_rag_answer(answer_fn: Callable, recorder: _RecordingEngine | None) -> Callable:
    """RAG timings in MSA's names: routing_s = retrieval, first_token_s = retrieval + generator prefill
    and first token, total_s."""

    def answer(question: str):
        if recorder is not None:
            recorder.last = None
        res = answer_fn(question)
        t = dict(res.timings)
        t["routing_s"] = t.get("retrieve_s", 0.0)
        last = recorder.last if recorder is not None else None
        if last is not None:
            t["first_token_s"] = t["routing_s"] + last.timings.get("first_token_s", 0.0)
            t["prefill_s"] = last.timings.get("prefill_s")
            t["decode_s"] = last.timings.get("decode_s")
            res.tokens["prompt_tokens"] = last.prompt_tokens
            res.tokens["completion_tokens"] = last.completion_tokens
        res.timings = t
        return res

    return answer


def _rag_prompt_answer(rag: Any, es: EvalSet, engine: Any, style: str, k: int, max_new_tokens: int) -> Callable:
    """A RAG retriever's top-k documents answered with the engine's interleave prompt in `style` (what
    MSA's generator would read had it routed these documents), greedy, without LlamaIndex's synthesizer."""
    from msa_plugins.engine.generation import GenerationStats, context_prompt, decode_stream, generate_tokens

    from .harness import AnswerResult, Context

    texts = dict(zip(es.doc_ids, es.memory_texts()))
    model = engine.model

    def answer(question: str):
        t0 = time.perf_counter()
        hits = rag.retrieve(question, k)
        t1 = time.perf_counter()
        contexts = [Context(str(i), texts[str(i)], float(sc)) for i, sc in hits]
        prompt = context_prompt(model, question, [c.text for c in contexts], style=style,
                                system=engine.config.system_prompt)
        stats = GenerationStats()
        text = "".join(decode_stream(model.tokenizer, generate_tokens(model, prompt.ids, max_new_tokens, 0.0,
                                                                      stats=stats))).strip()
        t2 = time.perf_counter()
        timings = {"retrieve_s": t1 - t0, "routing_s": t1 - t0, "prefill_s": stats.prefill_s,
                   "decode_s": stats.decode_s, "first_token_s": t1 - t0 + stats.first_token_s, "total_s": t2 - t0}
        tokens = {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                  "context_chars": sum(len(c.text) for c in contexts), "answer_chars": len(text)}
        return AnswerResult(text, contexts, timings, tokens)

    return answer


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
