"""Settings: `MSAConfig` (how a memory is built; frozen, fingerprinted where it changes the keys) and
`AnswerOptions` (how one question is answered; defaults in `MSAConfig.answer`, overridable per call).

Environment variables read by the package (each documented where it is read):
    MSA_MODEL           `MSAEngine.from_pretrained`'s model when none is passed (a folder, .gguf file or hub id)
    MSA_ROUTER          its router when none is passed (a router folder, or "none")
    MSA_MEMORY          a saved memory folder to load when none is passed
    MSA_DEVICE          its device when none is passed ("cpu", "cuda", "cuda:1")
    MSA_PLUGINS_CACHE   where the converted default model is cached (default ~/.cache/msa-plugins)
    MSA_DATASETS        the evaluation data root (default ../shared/datasets beside the working directory)
    MSA_ROUTING_TUNE    autotune the Triton routing kernel on first use (1) or use a fixed config (0)
    MSA_KV_CACHE        "cat" selects the old growing KV cache (for benchmarks); default: preallocated
    MSA_RERANK_PREFIX   "off" runs every rerank prompt whole, the shared anchor too (for benchmarks); default: shared
    MSA_API_KEYS        `msa serve`'s API keys: "KEY=mem1,mem2;KEY2=mem3" (see msa_plugins/server.py)
    MSA_CACHE_DIR       `msa eval`'s encoded-memory cache lives in $MSA_CACHE_DIR/eval-banks (default ~/.cache/msa-plugins)

This module imports only `errors` and `validation`: every layer may read its constants.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Optional

from .errors import InvalidArgumentError, InvalidTypeError
from .validation import check_choice, check_int, check_optional_int, check_stop, check_temperature, check_utf8

MODES = ("interleave", "sparse", "protocol")
# How documents are ranked (`AnswerOptions.routing`): "msa" the router alone (the default), "hybrid" the
# router's ranking fused with BM25 over the memory's texts (`MSAConfig.hybrid_fusion`), "lexical" BM25 alone.
ROUTINGS = ("msa", "hybrid", "lexical")
# routing keys pooled over 16 tokens instead of 64 route better on the corpora the router never saw (and about
# the same on the one it was trained on), for 1.8x the memory's bytes (docs/results/routing_key_chunks.md)
DEFAULT_ROUTING_CHUNK_SIZE = 16
DOC_SCORES = ("maxmax", "late")  # how a document's chunk scores become its score (`MSAConfig.doc_score`)
FUSIONS = ("rrf", "zsum")
ROUND_ROUTINGS = ("chain", "concat")  # how routing rounds after the first read what earlier rounds found
RERANK_SCORINGS = ("single", "path")  # rerank=N: each candidate alone, or also after the top one (engine/rerank.py)
NOT_IN_MEMORY = "Not in memory."  # the answer of an abstained query (`AnswerOptions.abstain`)

# Every memory document belongs to one collection (Chroma's shape: a tenant, a store, an app's namespace).
DEFAULT_COLLECTION = "default"
ALL_COLLECTIONS = "*"  # routing over every collection, when asked for explicitly

# How interleave mode shows the routed documents to the generator (`AnswerOptions.prompt_style`):
# - "msa": "Use the following documents to answer." + numbered "[i] doc" blocks + "Question: {q}", in the
#   user turn, with the chat template's default system prompt;
# - "llamaindex" (the default): LlamaIndex's default chat text-QA prompt (its Q&A system message, then
#   "Context information is below. ---... {documents} ---... Given the context information and not prior
#   knowledge, answer the query. Query: {q} Answer: "), the documents joined by blank lines as LlamaIndex's
#   synthesizer joins node texts: the prompt the RAG baseline of `msa eval` gets;
# - "llamaindex-nosystem": the same user turn with the chat template's default system prompt.
# An explicit system prompt (`AnswerOptions.system`) replaces the style's.
PROMPT_STYLES = ("msa", "llamaindex", "llamaindex-nosystem")
DEFAULT_PROMPT_STYLE = "llamaindex"  # SmolLM2-135M answered more PopQA questions with it (docs/results/ab_first_results.md)


@dataclass(frozen=True)
class AnswerOptions:
    """How one question is answered. Every field is checked here, once, for every surface (engine, CLI,
    LlamaIndex, LangChain): a bad value raises `InvalidArgumentError` / `InvalidTypeError` naming it."""
    mode: str = "interleave"  # "interleave" (documents' text in the prompt), "sparse" (pooled K/V), "protocol"
    k: int = 5  # documents per question (paper: 16); per round when rounds > 1 and k_per_round
    rounds: int = 1  # interleave: routing rounds (re-route on question + injected text)
    # interleave with rounds > 1: True, every round adds k documents (k x rounds in the prompt); False, k is
    # the total, split over the rounds as `retrieve(rounds=)` splits it (the same k a single-shot retriever gets)
    k_per_round: bool = True
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    system: Optional[str] = None  # None: the prompt style's / chat template's default system prompt
    prompt_style: Optional[str] = None  # interleave prompt (PROMPT_STYLES); None: DEFAULT_PROMPT_STYLE
    seed: Optional[int] = None  # sampling seed (temperature > 0)
    stop: Optional[tuple] = None  # stop strings: generation ends before the first one
    routing: str = "msa"  # ROUTINGS: the router alone, hybrid (router + BM25), or BM25 alone
    abstain: bool = False  # answer NOT_IN_MEMORY (QueryResult.abstained) when routing is below the memory's
    #                        calibrated threshold (MSAEngine.calibrate_abstention)
    # interleave: 0, the routing's order; N > 0, each round's top max(N, its share of k) candidates reordered by
    # how likely the model finds the question given each one (UPR), fused with their routing (later rounds: chain)
    # scores (engine/rerank.py)
    rerank: int = 0

    def __post_init__(self):
        check_choice(self.mode, MODES, "mode")
        check_choice(self.routing, ROUTINGS, "routing")
        for name in ("abstain", "k_per_round"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_int(self.k, "k", minimum=1)
        check_int(self.rounds, "rounds", minimum=1)
        check_int(self.rerank, "rerank", minimum=0)
        if self.rerank and self.mode != "interleave":  # sparse and protocol attend to each layer's own picks
            raise InvalidArgumentError(f"rerank={self.rerank} reorders the documents interleave reads, and mode "
                                       f"{self.mode!r} attends to each routing layer's own selection; use "
                                       "mode='interleave' or rerank=0")
        if self.rounds > 1 and self.mode != "interleave":  # sparse and protocol route once
            raise InvalidArgumentError(f"rounds={self.rounds} is interleave's multi-hop routing, and mode "
                                       f"{self.mode!r} routes once; use mode='interleave' or rounds=1")
        check_int(self.max_new_tokens, "max_new_tokens", minimum=1)
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if self.system is not None and not isinstance(self.system, str):
            raise InvalidTypeError(f"system must be a str or None, got {type(self.system).__name__}")
        if self.system is not None:
            check_utf8(self.system, "the system prompt")
        if self.prompt_style is not None:
            check_choice(self.prompt_style, PROMPT_STYLES, "prompt_style")
        if self.seed is not None:  # torch's generator takes a 64-bit seed
            check_int(self.seed, "seed", minimum=-(2 ** 63), maximum=2 ** 64 - 1)
        object.__setattr__(self, "stop", check_stop(self.stop))

    def merged(self, **overrides) -> "AnswerOptions":
        """A copy with the given fields replaced; None means "keep this one's"."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InvalidTypeError(f"unknown answer option(s) {unknown}; the options are "
                                   f"{[f.name for f in dataclasses.fields(self)]}")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


ANSWER_FIELDS = tuple(f.name for f in dataclasses.fields(AnswerOptions))
# settings that used to live flat on MSAConfig, accepted by `from_pretrained(**overrides)` under their old names
_ANSWER_ALIASES = {"system_prompt": "system"}


@dataclass(frozen=True)
class MSAConfig:
    """How the memory is built and bounded. Frozen: `with_overrides` returns a changed copy.

    The fields marked (fingerprinted) change the stored keys: a memory saved under one value does not
    load under another."""
    chunk_size: int = 64  # P: tokens per pooled chunk (paper: 64) (fingerprinted)
    # P_R: tokens per pooled ROUTING key; None = min(16, chunk_size). Content K̄/V̄ stay pooled at P; only the
    # routing keys (and kept inputs) are finer, so routing can single out a sentence that a 64-token mean
    # blurs (docs/results/routing_key_chunks.md). The paper's one P for both: routing_chunk_size=chunk_size.
    # (fingerprinted when not P; a loaded memory brings its own)
    routing_chunk_size: Optional[int] = None
    routing_layers: Optional[tuple] = None  # None: the router's layers, else the model's upper half (fingerprinted)
    score: str = "cosine"  # routing score: "cosine" (paper, training) or "dot" (fingerprinted)
    # a document's score from its chunks' (fingerprinted when not the default): "maxmax" (paper: max over
    # chunks of the max over question tokens) or "late" (mean over question tokens of the max over chunks)
    doc_score: str = "maxmax"
    # routing="hybrid": "zsum" (z-normalised score sum) or "rrf" (reciprocal rank fusion); zsum was chosen
    # once on HotpotQA's dev questions (docs/results/hybrid_routing.md) and is fixed for every corpus
    hybrid_fusion: str = "zsum"
    # rounds > 1 (multi-hop): "chain" (each found document routes the question with its own chain of texts,
    # chains scored as a beam; MDR) or "concat" (one routing with every found text); engine/routing.py says more.
    # Either way later rounds route among the documents not found yet.
    round_routing: str = "chain"
    # rerank=N > 0: "single" (z(routing) + z(log P(question | candidate)), UPR) or "path" (adds z(log P(question |
    # anchor + candidate)), the anchor being the candidate "single" ranks first: one more forward per candidate,
    # about twice as long; measured in docs/results/routing_levers.md, stop 32)
    rerank_scoring: str = "single"
    int8_routing_keys: bool = False  # routing keys as int8 + per-head scale: half the bytes (fingerprinted)
    keep_inputs: bool = False  # keep pooled layer inputs so the memory can be re-keyed for a new router
    max_doc_tokens: Optional[int] = None  # None: the model's window; longer documents are split
    split_long_documents: bool = True  # False: a too-long document is an error instead
    max_question_tokens: Optional[int] = None  # None: the model's window; longer questions are refused
    batch_tokens: int = 4096  # encoding batch size in (padded) tokens
    content_tier: str = "device"  # where content K̄/V̄ lives: "device" (with the model) or "host" (CPU, pinned)
    routing_backend: str = "auto"  # "auto" (Triton on CUDA), "torch", "triton"
    max_rounds: int = 4  # cap on interleave rounds and on protocol retrieval steps
    protocol_end_marker: str = "[END]"  # trained-checkpoint protocol: end of retrieval
    protocol_delimiter: str = "\n"
    answer: AnswerOptions = field(default_factory=AnswerOptions)  # per-call defaults

    def __post_init__(self):
        check_int(self.chunk_size, "chunk_size", minimum=1)
        check_optional_int(self.routing_chunk_size, "routing_chunk_size", minimum=1)
        if self.routing_layers is not None:
            if isinstance(self.routing_layers, (str, bytes)) or not hasattr(self.routing_layers, "__iter__"):
                raise InvalidTypeError(f"routing_layers must be a list of layer indices, got {self.routing_layers!r}")
            layers = tuple(self.routing_layers)
            for layer in layers:
                check_int(layer, "a routing layer", minimum=0)
            if not layers:
                raise InvalidArgumentError("routing_layers is empty; give at least one layer, or None for the default")
            object.__setattr__(self, "routing_layers", layers)
        check_choice(self.score, ("cosine", "dot"), "score")
        check_choice(self.doc_score, DOC_SCORES, "doc_score")
        check_choice(self.hybrid_fusion, FUSIONS, "hybrid_fusion")
        check_choice(self.round_routing, ROUND_ROUTINGS, "round_routing")
        check_choice(self.rerank_scoring, RERANK_SCORINGS, "rerank_scoring")
        check_choice(self.content_tier, ("device", "host"), "content_tier")
        check_choice(self.routing_backend, ("auto", "torch", "triton"), "routing_backend")
        check_optional_int(self.max_doc_tokens, "max_doc_tokens", minimum=1)
        check_optional_int(self.max_question_tokens, "max_question_tokens", minimum=1)
        check_int(self.batch_tokens, "batch_tokens", minimum=1)
        check_int(self.max_rounds, "max_rounds", minimum=1)
        for name in ("keep_inputs", "split_long_documents", "int8_routing_keys"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.answer, AnswerOptions):
            raise InvalidTypeError(f"answer must be an AnswerOptions, got {type(self.answer).__name__}")

    @property
    def key_chunk_size(self) -> int:
        """P_R, the tokens pooled into one routing key: `routing_chunk_size`, or when None the default
        (DEFAULT_ROUTING_CHUNK_SIZE, or chunk_size when that is smaller)."""
        if self.routing_chunk_size is None:
            return min(self.chunk_size, DEFAULT_ROUTING_CHUNK_SIZE)
        return self.routing_chunk_size

    def with_overrides(self, **overrides) -> "MSAConfig":
        """A copy with build settings and answer defaults replaced: `with_overrides(chunk_size=32, k=8)`.
        Unknown names raise `InvalidTypeError` listing the settings."""
        build_fields = {f.name for f in dataclasses.fields(self)} - {"answer"}
        build, answer = {}, {}
        for key, value in overrides.items():
            key_answer = _ANSWER_ALIASES.get(key, key)
            if key in build_fields:
                build[key] = value
            elif key_answer in ANSWER_FIELDS:
                answer[key_answer] = value
            else:
                raise InvalidTypeError(f"unknown setting {key!r}; MSAConfig has {sorted(build_fields)} and "
                                       f"AnswerOptions has {list(ANSWER_FIELDS)}")
        if answer:
            build["answer"] = dataclasses.replace(self.answer, **answer)
        return dataclasses.replace(self, **build) if build else self

    def to_dict(self) -> dict:
        return asdict(self)
