"""Router training on cached features (the MSA paper, section 6). Below the facade: it works on a
`DecoderModel`, routing layers, an `Encoder`, `FeatureCache`s and tensors, never on an `MSAEngine`
(`msa_plugins.trainer` composes it with an engine).

The backbone is frozen and a router is linear, so everything a router ever reads can be cached once:
- documents: the chunk-pooled normalised layer inputs H̄ [L, C, hidden] of every routing layer (pooling
  commutes with a linear map: K̄_R = mean_pool(H) W_KR^T = mean_pool(H W_KR^T)), from `Encoder.encode`;
- queries: the normalised layer inputs of the question's own tokens [L, T, hidden], from
  `Encoder.question_states` (the very function routing uses, on the same chat-template prompt).
A `FeatureCache` holds both (saved as safetensors + JSON); training and evaluation then touch only the
router and cached tensors, never the model. Scores are the routing score of the MSA paper, section 3 (cosine,
head-mean, max over question tokens, max over a document's chunks).

Loss: InfoNCE (tau 0.1) over document scores, per routing layer and on the layer-mean score; negatives are
every other document of the bank (which includes the hardest ones), or, for banks above `max_negatives`
documents, mined hard negatives (top-scored wrong documents under the current router) plus random ones.
Training data: supervised (query, gold documents) pairs and unsupervised inverse-cloze pairs (a title or
a sentence of a document as the query, that document as the positive), combinable.

Nothing here unpickles: feature caches, checkpoints and routers are safetensors + JSON. A planted pickle
checkpoint (`checkpoint.pt` of older versions) is never opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DuplicateIdError, InvalidArgumentError, MemoryFormatError, PathNotFoundError
from ..metrics import retrieval_metrics
from ..validation import check_choice, check_int
from .encoding import Encoder, length_batches
from .generation import Prompt
from .model import DecoderModel, KVCache
from .storage import remove_file
from ..kernels.routing import DOC_SCORES
from .router import ADAPTER_FILES, QKRouter, Router

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CHECKPOINT_FORMAT_VERSION = 1
# Query features are kept in fp16 (the dtype the cache is saved in) and turned into fp32 a batch at a time
# by `TrainableRouter.scores`. They are one row per query token, so they are most of a cache: HotpotQA's
# 3,019 queries take 391 MiB in fp16; a 6,119-passage corpus's pseudo-queries about 4.8 GB in fp32
# (benchmarks/query_feature_memory.py). A query whose values do not fit in fp16 (|x| > 65504) keeps the whole
# cache's queries in fp32 instead.
QUERY_DTYPE = torch.float16
CHECKPOINT = "checkpoint.safetensors"  # tensors + the JSON training state in its header metadata
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle, written by older versions: never loaded
INITS = ("qk", "tied-random", "identity", "random")
NEGATIVES = ("bank", "mined")


# ====================================================================== feature cache
@dataclass
class FeatureCache:
    """Cached router inputs of one bank and a set of queries (all tensors on CPU unless moved)."""

    layers: list
    doc_ids: list
    doc_start: torch.Tensor  # [N+1] chunk offsets
    chunk_doc: torch.Tensor  # [C]
    inputs: torch.Tensor  # [L, C, hidden]
    q_text: list = field(default_factory=list)
    q_kind: list = field(default_factory=list)  # "question" / "ict-title" / "ict-sentence" / ...
    q_pos: list = field(default_factory=list)  # per query: list of doc rows (positives)
    q_start: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))  # [Q+1]
    q_inputs: Optional[torch.Tensor] = None  # [L, Ttot, hidden]
    meta: dict = field(default_factory=dict)

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def n_queries(self) -> int:
        return len(self.q_text)

    def row_of(self) -> dict:
        return {d: i for i, d in enumerate(self.doc_ids)}

    def add_queries(self, texts: list, inputs, positives: list, kind="question", lengths=None) -> None:
        """inputs: per query [L, T, hidden] (a list), or all of them one after another [L, sum T, hidden] with
        `lengths` [Q] (as `packed_question_features` makes them: the first queries of a cache adopt that tensor,
        no copy; do not modify it afterwards). Any float dtype; kept in QUERY_DTYPE (fp32 if a value does not
        fit in it). kind: one for all the queries, or one per query."""
        kinds = [kind] * len(texts) if isinstance(kind, str) else list(kind)
        if isinstance(inputs, torch.Tensor):
            lengths = torch.as_tensor(lengths if lengths is not None else [], dtype=torch.long)
            if inputs.dim() != 3 or lengths.numel() != len(texts) or int(lengths.sum()) != inputs.shape[1] \
                    or bool((lengths < 1).any()):
                raise InvalidArgumentError(f"packed inputs of {inputs.shape[-2] if inputs.dim() == 3 else '?'} tokens "
                                           f"need lengths: one per query ({len(texts)}), each >= 1, adding up to "
                                           f"the tokens; got {lengths.tolist()}")
            parts = [inputs]
        else:
            if lengths is not None:  # a list carries its own lengths: a second, maybe different, set is refused
                raise InvalidArgumentError("lengths go with packed inputs (one [L, sum T, hidden] tensor); a list of "
                                           "per-query tensors has its own: drop lengths")
            parts, lengths = list(inputs), torch.tensor([x.shape[1] for x in inputs], dtype=torch.long)
        if not (len(texts) == len(lengths) == len(positives) == len(kinds)):
            raise InvalidArgumentError(f"texts ({len(texts)}), inputs ({len(lengths)}), positives ({len(positives)}) "
                                       f"and kinds ({len(kinds)}) must have the same length")
        if not texts:
            return
        dtype = QUERY_DTYPE if self.q_inputs is None or self.q_inputs.dtype == QUERY_DTYPE else torch.float32
        if dtype == QUERY_DTYPE and not all(map(_fits, parts)):
            logger.info("query features exceed the %s range (or are not finite): the feature cache keeps them in "
                        "fp32", QUERY_DTYPE)
            dtype = torch.float32
        if self.q_inputs is not None and self.q_inputs.dtype != dtype:
            self.q_inputs = self.q_inputs.to(dtype)
        # [L, sum T, hidden]. A packed tensor of their own (not a view of a larger one) in the kept dtype is
        # adopted as is: the caller hands it over. Anything else is copied, never aliased.
        own = isinstance(inputs, torch.Tensor) and inputs._base is None and inputs.dtype == dtype
        new = inputs if own else torch.cat([x.to(dtype) for x in parts], dim=1)
        if self.q_inputs is not None:
            new = torch.cat([self.q_inputs, new.to(self.q_inputs.device)], dim=1)
        self.q_inputs = new
        self.q_start = torch.cat([self.q_start, self.q_start[-1] + lengths.cumsum(0)])
        self.q_text.extend(texts)
        self.q_kind.extend(kinds)
        self.q_pos.extend([list(map(int, p)) for p in positives])

    def on_layers(self, layers: Sequence[int]) -> "FeatureCache":
        """This cache on some of its routing layers, in the order given: those layers' features are copied out,
        everything else (documents, queries, offsets) is shared."""
        idx = [self.layers.index(layer) for layer in layers]
        return FeatureCache(list(layers), self.doc_ids, self.doc_start, self.chunk_doc, self.inputs[idx], self.q_text,
                            self.q_kind, self.q_pos, self.q_start,
                            None if self.q_inputs is None else self.q_inputs[idx], self.meta)

    def query_indices(self, kinds: Optional[Iterable[str]] = None) -> list:
        """Indices of the queries of these kinds ("ict" matches "ict-title" and "ict-sentence"); all when None."""
        if kinds is None:
            return list(range(self.n_queries))
        kinds = set(kinds)
        return [i for i, k in enumerate(self.q_kind) if k in kinds or any(k.startswith(p + "-") for p in kinds)]

    def to(self, device=None, dtype=None) -> "FeatureCache":
        self.inputs = self.inputs.to(device=device, dtype=dtype)
        if self.q_inputs is not None:
            self.q_inputs = self.q_inputs.to(device=device, dtype=dtype)
        self.chunk_doc = self.chunk_doc.to(device)
        return self

    def check(self, where: str = "feature cache") -> None:
        """Structural checks (a cache read from disk may be damaged or planted): raise `MemoryFormatError`."""
        def bad(msg):
            raise MemoryFormatError(f"{where}: {msg}; delete it to rebuild the features")

        N, L = len(self.doc_ids), len(self.layers)
        if self.inputs.dim() != 3 or self.inputs.shape[0] != L:
            bad(f"inputs have shape {tuple(self.inputs.shape)}, expected [{L} layers, chunks, hidden]")
        C = self.inputs.shape[1]
        ds = self.doc_start
        if ds.dim() != 1 or ds.numel() != N + 1 or int(ds[0]) != 0 or int(ds[-1]) != C or bool((ds.diff() < 1).any()):
            bad("doc_start is not a chunk offset table of the documents")
        if self.chunk_doc.shape != (C,) or not torch.equal(
                self.chunk_doc.cpu(), torch.repeat_interleave(torch.arange(N), ds.diff().cpu())):
            bad("chunk_doc does not match doc_start")
        if len(set(self.doc_ids)) != N:
            bad("document ids are not unique")
        Q = len(self.q_text)
        if not (len(self.q_kind) == len(self.q_pos) == Q) or self.q_start.dim() != 1 or self.q_start.numel() != Q + 1:
            bad("the query lists and q_start disagree in length")
        T = 0 if self.q_inputs is None else self.q_inputs.shape[1]
        if Q and (self.q_inputs is None or self.q_inputs.dim() != 3 or self.q_inputs.shape[0] != L
                  or self.q_inputs.shape[2] != self.inputs.shape[2]):
            bad("query inputs are missing or of the wrong shape")
        qs = self.q_start
        if int(qs[0]) != 0 or int(qs[-1]) != T or bool((qs.diff() < 1).any()):
            bad("q_start is not a token offset table of the queries")
        if any(not isinstance(p, int) or not 0 <= p < N for pos in self.q_pos for p in pos):
            bad("a query's positive is not a document row")
        if not bool(torch.isfinite(self.inputs).all()) or (self.q_inputs is not None
                                                           and not bool(torch.isfinite(self.q_inputs).all())):
            bad("features hold NaN or inf values")

    def save(self, directory: str, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        # Written into a fresh folder that then replaces the old one: a crash leaves the old cache, or none
        # (then it is rebuilt), never a features.json beside another run's tensors.
        directory = os.path.normpath(directory)
        if os.path.exists(directory) and not FeatureCache.exists(directory) and \
                (not os.path.isdir(directory) or os.listdir(directory)):
            raise InvalidArgumentError(f"{directory!r} exists and is not a feature cache; it would be replaced: "
                                       "move it away or choose another folder")
        tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        def stored(x):  # features that overflow `dtype` are written in fp32 rather than as inf
            fits = _fits(x, dtype)
            return x.to("cpu", dtype if fits else torch.float32).contiguous()

        t = {"inputs": stored(self.inputs), "doc_start": self.doc_start.cpu().contiguous(),
             "chunk_doc": self.chunk_doc.cpu().contiguous(), "q_start": self.q_start.cpu().contiguous()}
        if self.q_inputs is not None:
            t["q_inputs"] = stored(self.q_inputs)
        save_file(t, os.path.join(tmp, "features.safetensors"))
        with open(os.path.join(tmp, "features.json"), "w", encoding="utf-8") as f:
            json.dump({"format_version": CACHE_FORMAT_VERSION, "layers": self.layers, "doc_ids": self.doc_ids,
                       "q_text": self.q_text, "q_kind": self.q_kind, "q_pos": self.q_pos, "meta": self.meta},
                      f, ensure_ascii=False)
        old = f"{directory}.old-{os.getpid()}"
        if os.path.isdir(directory):
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def load(cls, directory: str, dtype: torch.dtype = torch.float32) -> "FeatureCache":
        """Read a cache written by `save`; a damaged, foreign or other-version one raises `MemoryFormatError`.
        `dtype`: the documents' features; query features stay as saved (fp16, or fp32 when written so)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        where = f"feature cache {directory!r}"
        try:
            with open(os.path.join(directory, "features.json"), encoding="utf-8") as f:
                m = json.load(f)
            t = load_file(os.path.join(directory, "features.safetensors"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError) as e:
            raise MemoryFormatError(f"{where} cannot be read ({e}); delete it to rebuild the features") from e
        if not isinstance(m, dict) or m.get("format_version") != CACHE_FORMAT_VERSION:
            version = m.get("format_version") if isinstance(m, dict) else None
            raise MemoryFormatError(f"{where} has format version {version!r} (this version reads "
                                    f"{CACHE_FORMAT_VERSION}); delete it to rebuild the features")
        try:
            cache = cls(list(m["layers"]), list(m["doc_ids"]), t["doc_start"], t["chunk_doc"], t["inputs"].to(dtype),
                        list(m["q_text"]), list(m["q_kind"]), [list(p) for p in m["q_pos"]], t["q_start"],
                        _query_store(t["q_inputs"]) if "q_inputs" in t else None, dict(m.get("meta") or {}))
        except (KeyError, TypeError) as e:
            raise MemoryFormatError(f"{where} lacks {e}; delete it to rebuild the features") from e
        cache.check(where)
        return cache

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, "features.json")) and \
            os.path.isfile(os.path.join(directory, "features.safetensors"))


def _query_store(x: torch.Tensor) -> torch.Tensor:
    """Saved query features as the cache keeps them: QUERY_DTYPE or fp32 as they are, anything else as fp32."""
    return x if x.dtype in (QUERY_DTYPE, torch.float32) else x.to(torch.float32)


def _fits(x: torch.Tensor, dtype: torch.dtype = QUERY_DTYPE) -> bool:
    """True when every value of `x` keeps its magnitude in `dtype` (no overflow to inf; NaN never fits)."""
    if x.dtype == dtype or not x.numel():
        return True
    lo, hi = torch.aminmax(x)  # no full-size temporary, unlike x.abs().max()
    return max(-float(lo), float(hi)) <= torch.finfo(dtype).max


# ====================================================================== features from the model
def feature_encoder(model: DecoderModel, layers: Sequence[int], chunk_size: int, batch_tokens: int = 4096) -> Encoder:
    """The encoder that makes router features: pooled layer inputs kept, in fp32 whatever the device (the
    router trained on them is used by CPU engines that encode in fp32). Its router is the training-free
    one: the routing keys it also computes are not used."""
    return Encoder(model, list(layers), chunk_size, QKRouter(model, layers), keep_inputs=True,
                   batch_tokens=batch_tokens, store_dtype=torch.float32)


def bank_features(encoder: Encoder, token_lists: Sequence[list], ids: Sequence[str],
                  progress: bool = True) -> FeatureCache:
    """Encode documents (token ids, one sequence each, as the memory encodes them) -> a FeatureCache
    holding their pooled layer inputs and no queries yet."""
    encoded = encoder.encode(list(token_lists), progress=progress, desc="encoding documents")
    counts = torch.tensor([e.inputs.shape[1] for e in encoded], dtype=torch.long)  # chunks per document
    doc_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])  # [N+1]
    chunk_doc = torch.repeat_interleave(torch.arange(len(encoded)), counts)  # [C]
    inputs = torch.cat([e.inputs for e in encoded], dim=1).float().cpu()  # N x [L, C_i, hidden] -> [L, C, hidden]
    return FeatureCache(list(encoder.routing_layers), list(ids), doc_start, chunk_doc, inputs,
                        meta={"n_tokens": int(sum(len(t) for t in token_lists))})


def question_features(encoder: Encoder, prompts: Sequence[Prompt], progress: bool = True,
                      desc: str = "queries") -> list:
    """Per prompt: the normalised layer inputs of its question tokens on the routing layers [L, T, hidden]
    (fp32, CPU), computed by `Encoder.question_states`: exactly what routing reads."""
    out = []
    for p in tqdm(prompts, desc=desc, disable=not progress, leave=False):
        h, _ = encoder.question_states(p.ids, p.question_mask)  # [L, Tq, hidden]
        out.append(h.float().cpu().clone())  # clone: a normal tensor, not an inference-mode one
    return out


def packed_question_features(model: DecoderModel, layers: Sequence[int], prompts: Sequence[Prompt],
                             batch_tokens: int = 4096, progress: bool = True, desc: str = "queries",
                             dtype: torch.dtype = torch.float32) -> tuple:
    """`question_features` for many prompts at once: right-padded batches of similar length, one forward
    each (a causal mask makes right padding harmless). A prompt is cut after its last question token:
    the tokens after it cannot change the question tokens' states.
    -> (features [L, sum Tq, hidden] on CPU, the prompts' question tokens one after another, lengths [Q]):
    equal to `question_features` concatenated, up to float rounding of batched matmuls. The features are
    written into one tensor of `dtype` as they are made, never held twice (QUERY_DTYPE for a FeatureCache,
    which adopts the tensor: thousands of pseudo-queries in half the RAM of fp32); when a prompt's values
    overflow `dtype`, the tensor turns fp32."""
    layers = list(layers)
    cut = []
    for p in prompts:
        last = max((i for i, m in enumerate(p.question_mask) if m), default=-1)
        if last < 0:
            raise InvalidArgumentError("a query has no tokens to route with; remove empty queries")
        cut.append((p.ids[:last + 1], p.question_mask[:last + 1]))
    lengths = torch.tensor([sum(map(bool, m)) for _, m in cut], dtype=torch.long)  # question tokens per prompt
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).tolist()
    out = torch.empty(len(layers), offsets[-1], model.hidden_size, dtype=dtype)  # a normal tensor, filled below
    if not cut:
        return out, lengths
    batches = length_batches([len(c[0]) for c in cut], batch_tokens)
    layer_set = set(layers)
    last = max(layers)
    # The template before the question (system prompt, user header) is the same for every query: run it
    # once and let each batch attend to its keys/values (about half of a short query's tokens).
    M = min(c[1].index(True) for c in cut)
    shared = M > 0 and all(c[0][:M] == cut[0][0][:M] for c in cut)
    prefix = None
    with torch.inference_mode():
        if shared:
            kv = {}

            def keep_kv(c):
                kv[c.layer] = (c.k, c.v)  # [1, G, M, D], post-RoPE at positions 0..M-1

            model.forward(torch.tensor([cut[0][0][:M]]), torch.arange(M)[None], capture=keep_kv, last_layer=last)
            prefix = [kv.get(i) for i in range(model.n_layers)]
        else:
            M = 0
    with torch.inference_mode(), tqdm(total=len(cut), desc=desc, disable=not progress, leave=False) as bar:
        for batch in batches:
            B, S = len(batch), max(len(cut[i][0]) for i in batch) - M
            ids = torch.zeros(B, S, dtype=torch.long)
            for b, i in enumerate(batch):
                ids[b, :len(cut[i][0]) - M] = torch.tensor(cut[i][0][M:], dtype=torch.long)
            positions = torch.arange(M, M + S)[None].expand(B, S)
            cache = None
            if prefix is not None:  # the reference (concatenating) cache path takes a batched prefix as is
                cache = KVCache(model.n_layers, memory=[None if p is None else (p[0].expand(B, -1, -1, -1),
                                                                                 p[1].expand(B, -1, -1, -1))
                                                        for p in prefix], preallocated=False)
            hs = {}

            def capture(c):
                if c.layer in layer_set:
                    hs[c.layer] = c.h_norm.float().cpu()  # [B, S, hidden]

            model.forward(ids, positions, cache=cache, capture=capture, last_layer=last)
            for b, i in enumerate(batch):
                sel = torch.tensor(cut[i][1][M:], dtype=torch.bool)
                x = torch.stack([hs[l][b, :len(sel)][sel] for l in layers])  # [L, Tq, hidden] fp32
                if not _fits(x, out.dtype):
                    logger.info("query features exceed the %s range (or are not finite): they are kept in fp32",
                                out.dtype)
                    with torch.inference_mode(False):  # a normal tensor, as the one it replaces
                        out = out.float()
                out[:, offsets[i]:offsets[i + 1]] = x
            bar.update(B)
    return out, lengths


def build_cache(model: DecoderModel, layers: Sequence[int], chunk_size: int, docs: Sequence,
                questions: Sequence = (), prompt: Optional[Callable[[str], Prompt]] = None,
                ict_per_doc: int = 2, ict_titles: bool = True, seed: int = 0, max_doc_tokens: Optional[int] = None,
                batch_tokens: int = 4096, progress: bool = True) -> FeatureCache:
    """One call for a corpus: docs = (id, title, text) triples (the bank text is "title\\ntext" when a title
    is given), questions = (question, [gold doc ids]) pairs (kind "question"), plus inverse-cloze pairs
    from the docs (kinds "ict-title", "ict-sentence").

    prompt: question -> the `Prompt` routing builds for it (default: the chat template, no system prompt);
    the features are those of its question tokens. A document longer than `max_doc_tokens` (default: the
    model's window) is refused: the memory would split it, and a split document is not one positive.
    Gold ids that are not documents are dropped (with a warning), and so are questions left without any."""
    from .generation import build_prompt

    prompt = prompt or (lambda q: build_prompt(model, q))
    max_doc_tokens = max_doc_tokens or model.max_positions
    ids = [str(d) for d, _, _ in docs]
    dup = sorted({d for d in ids if ids.count(d) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise DuplicateIdError(f"document ids {dup[:5]} appear more than once in the corpus; give each document its own id")
    token_lists = []
    for doc_id, title, text in docs:
        tokens = model.tokenizer(f"{title}\n{text}" if title else text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise InvalidArgumentError(f"document {doc_id!r} is empty; remove it from the corpus")
        if len(tokens) > max_doc_tokens:
            raise InvalidArgumentError(f"document {doc_id!r} has {len(tokens)} tokens, more than {max_doc_tokens} "
                                       "(the model's window); split it into shorter documents")
        token_lists.append(tokens)
    encoder = feature_encoder(model, layers, chunk_size, batch_tokens)
    cache = bank_features(encoder, token_lists, ids, progress=progress)
    row = cache.row_of()
    qs, dropped = [], 0
    for q, gold in questions:
        pos = [row[str(g)] for g in gold if str(g) in row]
        dropped += len(pos) < len(list(gold))
        if pos:
            qs.append((q, pos))
    if dropped:
        logger.warning("%d question(s) name gold documents that are not in the corpus: those ids are ignored "
                       "(questions left without any are skipped)", dropped)

    queries = [(q, p, "question") for q, p in qs]
    if ict_per_doc or ict_titles:
        queries += in_cache_order(inverse_cloze_pairs([(row[d], t, x) for d, (_, t, x) in zip(ids, docs)], ict_per_doc,
                                                      ict_titles, seed))
    if queries:
        prompts = [prompt(q) for q, _, _ in queries]
        empty = [q for (q, _, _), p in zip(queries, prompts) if not any(p.question_mask)]
        if empty:
            raise InvalidArgumentError(f"question(s) {empty[:3]!r} have no tokens; remove empty questions")
        # one batched pass over every query, written straight into the tensor the cache keeps
        feats, lengths = packed_question_features(model, layers, prompts, batch_tokens, progress=progress,
                                                  desc="queries", dtype=QUERY_DTYPE)
        cache.add_queries([q for q, _, _ in queries], feats, [p for _, p, _ in queries],
                          kind=[k for _, _, k in queries], lengths=lengths)
    cache.meta.update({"ict_per_doc": ict_per_doc, "ict_titles": ict_titles, "seed": seed})
    return cache


# ====================================================================== inverse-cloze pairs
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list:
    return [s.strip() for s in _SENT.split(text) if len(s.strip()) >= 20]


def inverse_cloze_pairs(docs: Sequence, per_doc: int = 2, titles: bool = True, seed: int = 0,
                        max_chars: int = 300) -> list:
    """Unsupervised pairs from a corpus: docs = (row, title, text) triples -> [(query, [row], kind)].

    Queries: the title (when given) and up to `per_doc` sentences drawn from the text (seeded); the
    positive is the whole document (its cached features include the sentence)."""
    rng = random.Random(seed)
    pairs = []
    for row, title, text in docs:
        if titles and title and title.strip():
            pairs.append((title.strip(), [row], "ict-title"))
        sents = split_sentences(text)
        if not sents and text.strip() and not title:
            sents = [text.strip()]
        for s in rng.sample(sents, min(per_doc, len(sents))):
            pairs.append((s[:max_chars], [row], "ict-sentence"))
    return pairs


ICT_KINDS = ("ict-title", "ict-sentence")


def in_cache_order(pairs: Sequence) -> list:
    """Inverse-cloze pairs in the order a feature cache holds them: every title, then every sentence (each
    kind in its own order). Which queries a seeded dev split holds out depends on it."""
    return [p for kind in ICT_KINDS for p in pairs if p[2] == kind]


# ====================================================================== the trainable router
def init_router_weights(model, layers: list, init: str, seed: int = 0):
    """-> (wq {layer: [H*D, hidden]}, wk {layer: [G*D, hidden]}) float32 on CPU.

    qk: the layer's own q_proj/k_proj (= training-free routing before RoPE, for models without q/k norm);
    tied-random: one random orthogonal projection per KV group, shared by that group's query heads and the
    key (the score starts as a cosine similarity of projected states); identity: the same, with slices of
    the identity instead of random directions; random: independent random orthogonal W_QR and W_KR."""
    H, G, D, hid = model.n_heads, model.n_kv_heads, model.head_dim, model.hidden_size
    gen = torch.Generator().manual_seed(seed)
    wq, wk = {}, {}

    def orth(rows, cols):  # orthonormal rows (rows <= cols) or columns
        if rows >= cols:
            return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0].contiguous()
        return torch.linalg.qr(torch.randn(cols, rows, generator=gen))[0].T.contiguous()

    for l in layers:
        if init == "qk":
            attn = model.layers[l].self_attn
            wq[l] = attn.q_proj.weight.detach().float().cpu().clone()
            wk[l] = attn.k_proj.weight.detach().float().cpu().clone()
        elif init in ("tied-random", "identity"):
            if init == "identity":
                base = torch.eye(hid)[: G * D] if G * D <= hid else torch.eye(G * D)[:, :hid]
            else:
                base = orth(G * D, hid)
            wk[l] = base.clone()
            per = H // G
            wq[l] = torch.cat([base[(h // per) * D:(h // per + 1) * D] for h in range(H)], dim=0).clone()
        elif init == "random":
            wq[l], wk[l] = orth(H * D, hid), orth(G * D, hid)
        else:
            raise InvalidArgumentError(f"unknown init {init!r}; use one of {INITS}")
    return wq, wk


class TrainableRouter(torch.nn.Module):
    """Per-layer W_QR / W_KR as parameters; scores queries against a cached bank (the MSA paper, section 3)."""

    def __init__(self, wq: dict, wk: dict, n_heads: int, n_kv_heads: int, head_dim: int, doc_score: str = "maxmax"):
        super().__init__()
        check_choice(doc_score, DOC_SCORES, "doc_score")
        self.doc_score = doc_score  # how chunk scores become a document's score, as `kernels.doc_scores`
        self.layers = sorted(wq)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = torch.nn.ParameterList([torch.nn.Parameter(wq[l].detach().float().clone()) for l in self.layers])
        self.wk = torch.nn.ParameterList([torch.nn.Parameter(wk[l].detach().float().clone()) for l in self.layers])

    @classmethod
    def from_router(cls, router: Router, doc_score: Optional[str] = None) -> "TrainableRouter":
        """doc_score: None = the one the router was trained for (its meta), else "maxmax"."""
        doc_score = doc_score or router.meta.get("doc_score", "maxmax")
        return cls(router.wq, router.wk, router.n_heads, router.n_kv_heads, router.head_dim, doc_score)

    def to_router(self, meta: Optional[dict] = None) -> Router:
        meta = dict(meta or {}, doc_score=self.doc_score)
        return Router({l: w.detach().float().cpu().clone() for l, w in zip(self.layers, self.wq)},
                      {l: w.detach().float().cpu().clone() for l, w in zip(self.layers, self.wk)},
                      self.n_heads, self.n_kv_heads, self.head_dim, meta=meta)

    def keys(self, i: int, pooled: torch.Tensor) -> torch.Tensor:
        """pooled inputs [C, hidden] -> unit-per-head routing keys [C, G*D]."""
        k = pooled @ self.wk[i].T
        return F.normalize(k.view(k.shape[0], self.n_kv_heads, self.head_dim), dim=-1).reshape(k.shape[0], -1)

    def queries(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """question token inputs [T, hidden] -> head-folded queries [T, G*D] (cosine head mean)."""
        q = (h @ self.wq[i].T).view(h.shape[0], self.n_heads, self.head_dim)
        q = F.normalize(q, dim=-1)
        G = self.n_kv_heads
        return (q.view(h.shape[0], G, self.n_heads // G, self.head_dim).sum(2) / self.n_heads).reshape(h.shape[0], -1)

    def scores(self, cache: FeatureCache, q_idx: Sequence[int], doc_rows: Optional[torch.Tensor] = None,
               chunk_block: int = 8192) -> torch.Tensor:
        """Document scores [L, B, N'] of queries `q_idx` against all documents (or `doc_rows`)."""
        dev = self.wq[0].device
        starts = cache.q_start
        spans = [(int(starts[i]), int(starts[i + 1])) for i in q_idx]
        tok = torch.cat([torch.arange(a, b) for a, b in spans]).to(cache.q_inputs.device)
        seg = torch.cat([torch.full((b - a,), j, dtype=torch.long) for j, (a, b) in enumerate(spans)]).to(dev)
        B = len(spans)
        if doc_rows is None:
            chunk_sel, chunk_doc, n_docs = None, cache.chunk_doc.to(dev), cache.n_docs
        else:
            ds = cache.doc_start
            chunk_sel = torch.cat([torch.arange(int(ds[r]), int(ds[r + 1])) for r in doc_rows.tolist()])
            chunk_doc = torch.repeat_interleave(torch.arange(len(doc_rows)),
                                                torch.tensor([int(ds[r + 1] - ds[r]) for r in doc_rows.tolist()])).to(dev)
            n_docs = len(doc_rows)
            chunk_sel = chunk_sel.to(cache.inputs.device)
        out = []
        for i in range(len(self.layers)):
            h = cache.q_inputs[i].index_select(0, tok).to(dev, torch.float32)
            q = self.queries(i, h)  # [Ttot, GD]
            pooled = cache.inputs[i] if chunk_sel is None else cache.inputs[i].index_select(0, chunk_sel)
            pooled = pooled.to(dev, torch.float32)
            k = self.keys(i, pooled)  # [C, GD]
            s = q @ k.T  # [Ttot, C]
            if self.doc_score == "late":
                # late interaction: per token, the max over each document's chunks [Ttot, N'] ...
                tokdoc = torch.full((s.shape[0], n_docs), float("-inf"), device=dev, dtype=s.dtype)
                tokdoc = tokdoc.scatter_reduce(1, chunk_doc[None].expand(s.shape[0], -1), s, reduce="amax",
                                               include_self=True)
                # ... then the mean over each query's tokens [B, N']
                n_tok = torch.bincount(seg, minlength=B).clamp_min(1).to(s.dtype)  # [B]
                doc = torch.zeros(B, n_docs, device=dev, dtype=s.dtype).index_add(0, seg, tokdoc) / n_tok[:, None]
                out.append(doc)
                continue
            tokmax = torch.full((B, s.shape[1]), float("-inf"), device=dev, dtype=s.dtype)
            tokmax = tokmax.scatter_reduce(0, seg[:, None].expand_as(s), s, reduce="amax", include_self=True)
            doc = torch.full((B, n_docs), float("-inf"), device=dev, dtype=s.dtype)
            doc = doc.scatter_reduce(1, chunk_doc[None].expand(B, -1), tokmax, reduce="amax", include_self=True)
            out.append(doc)
        return torch.stack(out)  # [L, B, N']


def infonce(scores: torch.Tensor, pos_mask: torch.Tensor, tau: float = 0.1,
            exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Supervised contrastive loss (the MSA paper, section 6). scores [B, N], pos_mask [B, N] bool.

    Per positive p: -log(exp(s_p/tau) / (exp(s_p/tau) + sum over negatives exp(s_j/tau))), averaged over a
    query's positives, then over queries. exclude [B, N] bool: documents that are not negatives either
    (likely false negatives, or outside a mined negative set)."""
    z = scores / tau
    neg = z.masked_fill(pos_mask if exclude is None else pos_mask | exclude, float("-inf"))
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # [B, 1]
    per_pos = -(z - torch.logaddexp(z, neg_lse))  # [B, N]
    per_pos = per_pos.masked_fill(~pos_mask, 0.0)
    n_pos = pos_mask.sum(1).clamp_min(1)
    return (per_pos.sum(1) / n_pos).mean()


def routing_loss(scores: torch.Tensor, pos_mask: torch.Tensor, tau: float = 0.1, layer_weight: float = 1.0,
                 mean_weight: float = 1.0, exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores [L, B, N]: InfoNCE per layer (averaged) + InfoNCE on the layer-mean score."""
    per_layer = torch.stack([infonce(scores[i], pos_mask, tau, exclude) for i in range(scores.shape[0])]).mean()
    return layer_weight * per_layer + mean_weight * infonce(scores.mean(0), pos_mask, tau, exclude)


def distill_loss(scores: torch.Tensor, cols: torch.Tensor, teacher: torch.Tensor, tau: float = 0.1,
                 teacher_tau: float = 0.5, layer_weight: float = 1.0, mean_weight: float = 1.0) -> torch.Tensor:
    """scores [L, B, N], cols [B, K] candidate columns, teacher [B, K]: `distill_kl` per layer (averaged)
    + on the layer-mean score, like `routing_loss`."""
    cand = scores.gather(2, cols[None].expand(scores.shape[0], -1, -1))  # [L, B, K]
    per_layer = torch.stack([distill_kl(cand[i], teacher, tau, teacher_tau) for i in range(cand.shape[0])]).mean()
    return layer_weight * per_layer + mean_weight * distill_kl(cand.mean(0), teacher, tau, teacher_tau)


# ====================================================================== distillation from teacher retrievers
@dataclass
class TeacherTargets:
    """What teacher retrievers say about some queries of one feature cache: per query, K candidate document
    rows (the teachers' top K by their combined score, the query's positives forced in) and the combined
    teacher score of each candidate. Combined score: each teacher's scores standardised per query over the
    whole bank (z-scores: BM25 and cosine scales differ), averaged over teachers."""

    q_index: dict  # query index (of the cache) -> row of cand / scores
    cand: torch.Tensor  # [Q', K] document rows
    scores: torch.Tensor  # [Q', K] combined teacher z-scores
    false_neg: torch.Tensor  # [Q', K] bool: not a positive, yet the teachers score it above every positive
    teachers: list = field(default_factory=list)

    def select(self, q_idx: Sequence[int]):
        """-> (has [B] bool, cand [B, K], scores [B, K], false_neg [B, K]) for a batch (zeros where `has` is False)."""
        rows = [self.q_index.get(int(q), -1) for q in q_idx]
        has = torch.tensor([r >= 0 for r in rows], dtype=torch.bool)
        idx = torch.tensor([max(r, 0) for r in rows], dtype=torch.long)
        return has, self.cand[idx], self.scores[idx], self.false_neg[idx]

    def fingerprint(self) -> str:
        """Identifies the targets (a checkpoint trained on other targets is not resumed)."""
        import hashlib

        h = hashlib.sha256(json.dumps([self.teachers, sorted(self.q_index.items())]).encode())
        for t in (self.cand, self.scores):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def teacher_targets(teachers: dict, cache: FeatureCache, q_idx: Sequence[int], k: int = 32,
                    block: int = 256) -> TeacherTargets:
    """teachers: name -> fn(list of query indices) -> scores [b, n_docs] of those queries against every
    document of `cache` (higher = more relevant). -> `TeacherTargets` for `q_idx` (top `k` candidates each)."""
    if not teachers:
        raise InvalidArgumentError("teacher_targets needs at least one teacher")
    q_idx = [int(q) for q in q_idx]
    k = min(k, cache.n_docs)
    cands, scores, fneg = [], [], []
    for b0 in range(0, len(q_idx), block):
        qb = q_idx[b0:b0 + block]
        z = 0.0
        for fn in teachers.values():
            s = torch.as_tensor(fn(qb), dtype=torch.float32)  # [b, N]
            z = z + (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp_min(1e-6)
        z = z / len(teachers)  # [b, N]
        pos = _pos_mask(cache, qb, None, "cpu")  # [b, N]
        # the positives always take part; the rest of the K are the teachers' best
        top = z.masked_fill(pos, float("inf")).topk(k, dim=1).indices  # [b, K]
        top_z = z.gather(1, top)
        top_pos = pos.gather(1, top)
        best_pos = z.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)  # [b, 1]
        cands.append(top)
        scores.append(top_z)
        fneg.append(~top_pos & (top_z > best_pos))
    return TeacherTargets({q: i for i, q in enumerate(q_idx)}, torch.cat(cands), torch.cat(scores), torch.cat(fneg),
                          sorted(teachers))


def distill_kl(scores: torch.Tensor, teacher: torch.Tensor, tau: float = 0.1, teacher_tau: float = 0.5) -> torch.Tensor:
    """Listwise distillation: KL(p_teacher || p_router) over each query's candidate set, averaged over queries.
    scores, teacher: [B, K]; p_teacher = softmax(teacher / teacher_tau), p_router = softmax(scores / tau)."""
    log_p = F.log_softmax(teacher / teacher_tau, dim=1)
    log_q = F.log_softmax(scores / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


# ====================================================================== ranking and metrics
@torch.no_grad()
def rank_documents(router: "TrainableRouter", cache: FeatureCache, q_idx: Sequence[int], topk: int = 100,
                   batch_size: int = 64, layer_mean: bool = True) -> list:
    """Per query: the top `topk` document rows by the layer-mean score (the engine's aggregated ranking)."""
    out = []
    for b0 in range(0, len(q_idx), batch_size):
        s = router.scores(cache, q_idx[b0:b0 + batch_size])  # [L, B, N]
        agg = s.mean(0) if layer_mean else s[-1]
        k = min(topk, agg.shape[1])
        out.extend(agg.topk(k, dim=1).indices.cpu().tolist())
    return out


def evaluate(router, cache: FeatureCache, q_idx: Sequence[int], ks=(1, 5, 10)) -> dict:
    """recall@k and MRR of `router` (a Router or TrainableRouter) on the queries `q_idx` of `cache`."""
    if isinstance(router, Router):
        router = TrainableRouter.from_router(router).to(cache.inputs.device)
    ranks = rank_documents(router, cache, list(q_idx), topk=max(ks))
    return retrieval_metrics(ranks, [cache.q_pos[i] for i in q_idx], ks)


# ====================================================================== training
@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    tau: float = 0.1
    init: str = "tied-random"
    seed: int = 0
    patience: int = 3  # early stopping on dev MRR (epochs without improvement)
    max_negatives: int = 20000  # banks above this many documents: hard + random negatives
    hard_negatives: int = 64  # mined per query when sampling negatives
    layer_weight: float = 1.0
    mean_weight: float = 1.0
    # distillation from teacher retrievers (used when `train_router` gets `teacher` targets)
    infonce_weight: float = 1.0  # weight of the InfoNCE term against the labelled / inverse-cloze positives
    distill_weight: float = 1.0  # weight of the listwise KL term against the teachers' candidate scores
    teacher_tau: float = 0.5  # temperature of the teachers' (z-scored) candidate scores
    # "bank": every other document is a negative; "mined": only the router's own top `hard_negatives`, the
    # teachers' top candidates (minus those they score above the positive: likely false negatives) and
    # `random_negatives` random documents
    negatives: str = "bank"
    random_negatives: int = 64
    # how a document's chunk scores become its score while training (and in the router's meta: use the
    # router with the same `MSAConfig.doc_score`): "maxmax" (the paper's) or "late" (mean over question
    # tokens of the max over the document's chunks)
    doc_score: str = "maxmax"
    device: Optional[str] = None  # None: the model's device (CPU without a model)
    progress: bool = True

    def __post_init__(self):
        check_int(self.epochs, "epochs", minimum=1)
        check_int(self.batch_size, "batch_size", minimum=1)
        check_int(self.seed, "seed")
        check_int(self.patience, "patience", minimum=1)
        check_int(self.max_negatives, "max_negatives", minimum=1)
        check_int(self.hard_negatives, "hard_negatives", minimum=0)
        check_choice(self.init, INITS, "init")
        check_choice(self.negatives, NEGATIVES, "negatives")
        check_choice(self.doc_score, DOC_SCORES, "doc_score")
        check_int(self.random_negatives, "random_negatives", minimum=0)
        if self.device is not None and not isinstance(self.device, str):
            raise InvalidArgumentError(f"device must be a str such as 'cpu' or 'cuda', or None, got {self.device!r}")
        for name, positive in (("lr", True), ("tau", True), ("weight_decay", False), ("layer_weight", False),
                               ("mean_weight", False), ("infonce_weight", False), ("distill_weight", False),
                               ("teacher_tau", True)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise InvalidArgumentError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")

    def identity(self) -> dict:
        """The settings a checkpoint must share to be resumed (not epochs, patience, device, progress)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("epochs", "progress", "patience", "device")}
        if d["doc_score"] == "maxmax":  # the default: checkpoints written before the setting existed still resume
            del d["doc_score"]
        return d


def _pos_mask(cache, q_idx, doc_rows, device):
    n = cache.n_docs if doc_rows is None else len(doc_rows)
    mask = torch.zeros(len(q_idx), n, dtype=torch.bool)
    col = None if doc_rows is None else {int(r): j for j, r in enumerate(doc_rows.tolist())}
    for b, qi in enumerate(q_idx):
        for p in cache.q_pos[qi]:
            j = p if col is None else col.get(int(p))
            if j is not None:
                mask[b, j] = True
    return mask.to(device)


def _check_finite(tr: "TrainableRouter", loss: torch.Tensor, epoch: int, cfg: TrainConfig) -> None:
    """Stop before a diverged step's NaN/inf weights reach a checkpoint or a router file."""
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p).all()) for p in tr.parameters())
    if not finite:
        raise InvalidArgumentError(
            f"router training diverged in epoch {epoch + 1} (loss {float(loss):.4g}, or NaN/inf weights); nothing "
            f"of this epoch was saved. Lower the learning rate (lr={cfg.lr}) or raise tau (tau={cfg.tau}), "
            "and train again without resuming")


# ---------------------------------------------------------------------- checkpoints (safetensors + JSON)
def save_checkpoint(path: str, tr: "TrainableRouter", opt: torch.optim.Optimizer, state: dict,
                    best_state: Optional[dict]) -> None:
    """One safetensors file: the router's, the best router's and the optimizer's tensors, and the JSON
    training state (epoch, history, settings) in its header metadata. Written beside, then renamed over
    the old one: a crash leaves the previous checkpoint whole."""
    from safetensors.torch import save_file

    tensors = {f"router.{k}": v.detach().cpu().contiguous() for k, v in tr.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    opt_sd = opt.state_dict()
    scalars = {}  # per parameter: its non-tensor optimizer state
    for idx, st in opt_sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    doc = dict(state, format="msa-router-checkpoint", format_version=CHECKPOINT_FORMAT_VERSION,
               has_best=best_state is not None, opt_param_groups=opt_sd["param_groups"], opt_scalars=scalars)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata={"checkpoint": json.dumps(doc)})
    os.replace(tmp, path)


def load_checkpoint(path: str, tr: "TrainableRouter", opt: torch.optim.Optimizer) -> tuple:
    """Restore `tr` and `opt` from `save_checkpoint`'s file -> (state dict, best_state or None).
    A damaged or foreign file raises `MemoryFormatError` naming it."""
    from safetensors import SafetensorError, safe_open

    fix = "delete it, or train without resuming (resume=False, `--no-resume`)"
    try:
        with safe_open(path, framework="pt") as f:
            doc = json.loads((f.metadata() or {}).get("checkpoint", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise MemoryFormatError(f"training checkpoint {path!r} cannot be read ({e}); {fix}") from e
    if not isinstance(doc, dict) or doc.get("format") != "msa-router-checkpoint" \
            or doc.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise MemoryFormatError(f"{path!r} is not a router training checkpoint of format version "
                                f"{CHECKPOINT_FORMAT_VERSION}; {fix}")
    try:
        tr.load_state_dict({k[len("router."):]: v for k, v in tensors.items() if k.startswith("router.")})
        best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} if doc["has_best"] else None
        opt_state = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = value
        for idx, scalars in doc["opt_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        opt.load_state_dict({"state": opt_state, "param_groups": doc["opt_param_groups"]})
        state = {k: doc[k] for k in ("epoch", "best", "bad", "history", "identity")}
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise MemoryFormatError(f"training checkpoint {path!r} does not fit this router or is damaged ({e}); {fix}") from e
    return state, best


def last_epoch_router(out_dir: str, like: Router) -> Router:
    """The router of the last epoch `train_router` wrote to `out_dir`'s checkpoint (it returns the epoch with the
    best dev MRR instead). `like`: a router of the same layers and shapes (the one training started from). The
    router's meta is `like`'s description of the model (not of its training), the run's `train_config` and
    `history`, and `weights`: which epoch of which checkpoint."""
    path = os.path.join(out_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise PathNotFoundError(f"no training checkpoint {path!r}: give the folder train_router wrote (its out_dir; "
                                "`train_default_router.py --work-dir`)")
    tr = TrainableRouter.from_router(like)
    try:
        state, _ = load_checkpoint(path, tr, torch.optim.AdamW(tr.parameters()))
    except MemoryFormatError as e:
        raise MemoryFormatError(f"{e}. If the checkpoint is whole, `like` does not fit it: pass the router training "
                                "started from (the same layers and shapes)") from e
    identity = state["identity"]
    tr.doc_score = identity.get("doc_score", "maxmax")  # identity() leaves the default out
    settings = {k: v for k, v in identity.items() if k not in ("train", "dev", "data", "teacher", "layers")}
    training = ("trained_on", "train_config", "n_train", "n_dev", "history", "command", "provenance", "weights")
    meta = {k: v for k, v in like.meta.items() if k not in training}
    return tr.to_router(meta=dict(meta, weights=f"epoch {state['epoch'] + 1} of {path}", train_config=settings,
                                  history=state["history"]))


def _check_teachers(teachers: list, caches: list) -> None:
    """Teacher targets made for another cache (or given out of the caches' order) would index the wrong rows."""
    for ci, (t, c) in enumerate(zip(teachers, caches)):
        if t is None:
            continue
        if (t.cand.numel() and int(t.cand.max()) >= c.n_docs) or any(q >= c.n_queries for q in t.q_index):
            raise InvalidArgumentError(f"teacher targets {ci} were made for another feature cache (their rows do not "
                                       f"fit cache {ci}: {c.n_docs} documents, {c.n_queries} queries); give one "
                                       "per cache, in the caches' order")


def train_router(caches, train: Sequence, dev: Optional[Sequence] = None, model: Optional[DecoderModel] = None,
                 config: Optional[TrainConfig] = None, out_dir: Optional[str] = None, resume: bool = True,
                 init_router: Optional[Router] = None, meta: Optional[dict] = None,
                 log: Optional[Callable[[str], None]] = None,
                 teacher: Union[TeacherTargets, Sequence[Optional[TeacherTargets]], None] = None) -> tuple:
    """Train a router on cached features.

    caches: a FeatureCache or a list of them (each query scores against its own cache's bank).
    train / dev: lists of (cache index, query index) pairs (a plain list of ints means cache 0).
    model: the DecoderModel (for shapes and the `qk` init); or pass init_router.
    out_dir: checkpoint folder (`checkpoint.safetensors` each epoch, `best/` the best router so far); with
    resume=True a checkpoint written with the same settings and data continues where it stopped.
    log: progress lines (default: this module's logger, INFO).
    teacher: `TeacherTargets` for queries of cache 0, or a list of them, one per cache (None where a cache has
    none): adds the listwise distillation term (`distill_weight`) and, with negatives="mined", the teachers'
    hard negatives.
    Returns (best Router, history list of per-epoch dicts). Training that diverges (NaN/inf loss or
    weights) raises `InvalidArgumentError` and saves nothing of the diverged epoch."""
    log = log or logger.info
    cfg = config or TrainConfig()
    caches = list(caches) if isinstance(caches, (list, tuple)) else [caches]
    norm = lambda xs: [x if isinstance(x, tuple) else (0, int(x)) for x in (xs or [])]  # noqa: E731
    train, dev = norm(train), norm(dev)
    if not train:
        raise InvalidArgumentError("no training queries: give questions with gold documents and/or allow "
                                   "inverse-cloze pairs (ict_per_doc > 0)")
    bad_q = [(c, q) for c, q in train + dev if not 0 <= c < len(caches) or not 0 <= q < caches[c].n_queries]
    if bad_q:
        raise InvalidArgumentError(f"training/dev queries {bad_q[:3]} are not (cache, query) indices of the caches")
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if len(teachers) > len(caches):
        raise InvalidArgumentError(f"{len(teachers)} teacher targets for {len(caches)} feature caches: give at most "
                                   "one per cache, in the caches' order (None where a cache has none)")
    teachers += [None] * (len(caches) - len(teachers))
    _check_teachers(teachers, caches)
    layers = caches[0].layers
    torch.manual_seed(cfg.seed)
    if init_router is not None:
        tr = TrainableRouter.from_router(init_router, cfg.doc_score)
    else:
        if model is None:
            raise InvalidArgumentError("pass the model (for its shapes and q/k projections) or init_router")
        wq, wk = init_router_weights(model, layers, cfg.init, cfg.seed)
        tr = TrainableRouter(wq, wk, model.n_heads, model.n_kv_heads, model.head_dim, cfg.doc_score)
    device = cfg.device or (str(model.device) if model is not None else "cpu")
    tr = tr.to(device)
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"}
    if init_router is not None:  # cfg.init is not used: the router started from is
        train_config["init"] = init_router.fingerprint()
    meta = dict(meta or {}, train_config=train_config, layers=layers, n_train=len(train), n_dev=len(dev))
    # what a checkpoint must share to be resumed: the settings and the data (queries and their caches)
    identity = dict(cfg.identity(), layers=layers, train=[list(x) for x in train], dev=[list(x) for x in dev],
                    data=[c.meta.get("data_hash") for c in caches],
                    teacher=_teacher_fingerprint(teachers))
    if init_router is not None:
        identity["init_router"] = init_router.fingerprint()
    history, start_epoch, best, best_state, bad = [], 0, float("-inf"), None, 0
    ckpt = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if out_dir and os.path.exists(os.path.join(out_dir, LEGACY_CHECKPOINT)):
        logger.warning("ignoring %s: pickle checkpoints of older versions are never loaded (they can run code); "
                       "training starts afresh", os.path.join(out_dir, LEGACY_CHECKPOINT))
    if ckpt and resume and os.path.isfile(ckpt):
        st, best_state = load_checkpoint(ckpt, tr, opt)
        if st["identity"] != identity:
            diff = sorted(k for k in set(identity) | set(st["identity"]) if st["identity"].get(k) != identity.get(k))
            raise InvalidArgumentError(f"checkpoint {ckpt} was written with other settings or data (differs in "
                                       f"{diff}); resume with the same ones, train without resuming "
                                       "(resume=False, `--no-resume`), or use another output folder")
        history, start_epoch, bad = st["history"], st["epoch"] + 1, st["bad"]
        best = float("-inf") if st["best"] is None else st["best"]
        log(f"resumed from {ckpt} at epoch {start_epoch}")

    def dev_metrics():
        if not dev:
            return {}
        tr.eval()
        res = {}
        for ci, c in enumerate(caches):
            qi = [q for cj, q in dev if cj == ci]
            if qi:
                res[ci] = (len(qi), evaluate(tr, c, qi))
        tot = sum(n for n, _ in res.values())
        keys = next(iter(res.values()))[1].keys()
        return {k: sum(n * r[k] for n, r in res.values()) / tot for k in keys if k != "n_questions"}

    if start_epoch == 0 and dev:
        m0 = dev_metrics()
        init_name = "the given router" if init_router is not None else cfg.init
        log(f"epoch 0 (init {init_name}): dev " + " ".join(f"{k} {v:.3f}" for k, v in m0.items()))
        history.append({"epoch": 0, "loss": None, **{f"dev_{k}": v for k, v in m0.items()}})
        best, best_state = m0["mrr"], {k: v.detach().cpu().clone() for k, v in tr.state_dict().items()}
    rng = random.Random(cfg.seed)
    for epoch in range(start_epoch, cfg.epochs):
        rng.seed(cfg.seed * 1000 + epoch)
        order = list(train)
        rng.shuffle(order)
        batches = []
        for ci in range(len(caches)):  # a batch holds queries of one cache (one bank of negatives)
            qs = [q for cj, q in order if cj == ci]
            batches += [(ci, qs[i:i + cfg.batch_size]) for i in range(0, len(qs), cfg.batch_size)]
        rng.shuffle(batches)
        tr.train()
        tot, n = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
        for ci, qb in bar:
            c = caches[ci]
            t_has = t_cand = t_score = t_fneg = None
            if teachers[ci] is not None:
                t_has, t_cand, t_score, t_fneg = teachers[ci].select(qb)
            doc_rows = None
            if c.n_docs > cfg.max_negatives:
                extra = t_cand[t_has].flatten().tolist() if t_has is not None else []
                doc_rows = _sample_docs(tr, c, qb, cfg, rng, extra)
            scores = tr.scores(c, qb, doc_rows=doc_rows)  # [L, B, N']
            pos = _pos_mask(c, qb, doc_rows, scores.device)
            exclude = _negative_exclusions(scores, pos, doc_rows, t_has, t_cand, t_fneg, cfg, rng)
            loss = cfg.infonce_weight * routing_loss(scores, pos, cfg.tau, cfg.layer_weight, cfg.mean_weight, exclude)
            if t_has is not None and bool(t_has.any()) and cfg.distill_weight > 0:
                sel = t_has.nonzero().flatten().to(scores.device)
                cols = _columns(doc_rows, t_cand[t_has]).to(scores.device)  # [B', K]
                loss = loss + cfg.distill_weight * distill_loss(
                    scores.index_select(1, sel), cols, t_score[t_has].to(scores.device), cfg.tau, cfg.teacher_tau,
                    cfg.layer_weight, cfg.mean_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _check_finite(tr, loss.detach(), epoch, cfg)
            tot += float(loss.detach()) * len(qb)
            n += len(qb)
            bar.set_postfix(loss=f"{tot / n:.4f}")
        m = dev_metrics()
        rec = {"epoch": epoch + 1, "loss": tot / max(n, 1), **{f"dev_{k}": v for k, v in m.items()}}
        history.append(rec)
        log(f"epoch {epoch + 1}: loss {rec['loss']:.4f}" + ("" if not m else " dev " + " ".join(
            f"{k} {v:.3f}" for k, v in m.items())))
        score = m.get("mrr", -rec["loss"])  # without a dev split: the lowest training loss
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().cpu().clone() for k, v in tr.state_dict().items()}
        else:
            bad += 1
        if ckpt:
            os.makedirs(out_dir, exist_ok=True)
            save_checkpoint(ckpt, tr, opt, {"epoch": epoch, "best": best if math.isfinite(best) else None,
                                            "bad": bad, "history": history, "identity": identity}, best_state)
        if dev and bad >= cfg.patience:
            log(f"early stop after epoch {epoch + 1} (no dev MRR gain for {cfg.patience} epochs)")
            break
    if best_state is not None:
        tr.load_state_dict(best_state)
    router = tr.to_router(meta=dict(meta, history=history))
    router.check_finite("the trained router")
    if out_dir:
        router.save(os.path.join(out_dir, "best"))
    return router, history


def _teacher_fingerprint(teachers: list) -> Optional[object]:
    """What a checkpoint records of the teacher targets: one cache's fingerprint as before (older checkpoints
    still resume), else one fingerprint (or None) per cache."""
    prints = [None if t is None else t.fingerprint() for t in teachers]
    return prints[0] if not any(prints[1:]) else prints


@torch.no_grad()
def _sample_docs(tr, cache, qb, cfg, rng, extra=()) -> torch.Tensor:
    """Positives + mined hard negatives (top-scored under the current router) + `extra` rows (teacher
    candidates) + random documents -> sorted document rows."""
    s = tr.scores(cache, qb).mean(0)  # [B, N]
    hard = s.topk(min(cfg.hard_negatives, s.shape[1]), dim=1).indices.flatten().cpu().tolist()
    pos = [p for q in qb for p in cache.q_pos[q]]
    keep = set(pos) | set(hard) | set(int(x) for x in extra)
    n_rand = max(0, cfg.max_negatives - len(keep))
    rand = rng.sample(range(cache.n_docs), min(n_rand, cache.n_docs))
    return torch.tensor(sorted(keep | set(rand)), dtype=torch.long)


def _columns(doc_rows: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Document rows -> their columns in a score matrix over `doc_rows` (sorted; None: all documents)."""
    return rows if doc_rows is None else torch.searchsorted(doc_rows, rows)


@torch.no_grad()
def _negative_exclusions(scores, pos, doc_rows, t_has, t_cand, t_fneg, cfg, rng) -> Optional[torch.Tensor]:
    """[B, N'] bool mask of documents that are not InfoNCE negatives, or None (all are).
    With negatives="mined", only the router's own top `hard_negatives`, the teachers' candidates and
    `random_negatives` random documents are negatives, and teacher false negatives (candidates the teachers
    score above every positive: likely relevant too, RocketQA-style denoising) are not."""
    B, N = scores.shape[1], scores.shape[2]
    if cfg.negatives != "mined":
        return None
    keep = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    hard = scores.mean(0).masked_fill(pos, float("-inf")).topk(min(cfg.hard_negatives, N), dim=1).indices
    keep.scatter_(1, hard, True)  # the router's own hard negatives
    if cfg.random_negatives:
        g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        keep.scatter_(1, torch.randint(0, N, (B, cfg.random_negatives), generator=g).to(scores.device), True)
    exclude = ~keep
    if t_has is not None and bool(t_has.any()):
        cols = _columns(doc_rows, t_cand).to(scores.device)  # [B, K]
        has = t_has[:, None].to(scores.device)
        fneg = (t_fneg.to(scores.device) & has)
        # the teachers' candidates are negatives, except their likely false negatives
        exclude.scatter_(1, cols, exclude.gather(1, cols) & ~has | fneg)
    return exclude


def export_msa4b(router: Router, path: str) -> None:
    """Write the router's projectors under MSA-4B weight names into one safetensors file."""
    from safetensors.torch import save_file

    router.check_finite(f"router not exported to {path!r}")
    save_file({k: v.contiguous().cpu() for k, v in router.to_msa4b_state_dict().items()}, path,
              metadata={"format": "msa4b-router", "n_heads": str(router.n_heads),
                        "n_kv_heads": str(router.n_kv_heads), "head_dim": str(router.head_dim)})


def remove_checkpoints(out_dir: str) -> int:
    """Delete what `train_router` wrote into `out_dir` (the checkpoint and `best/`), by those names only, and
    the folders when that leaves them empty; anything else there is kept. Returns the bytes freed."""
    best = os.path.join(out_dir, "best")
    freed = sum(remove_file(p) for p in [os.path.join(out_dir, CHECKPOINT)] +
                [os.path.join(best, name) for name in ADAPTER_FILES])
    for folder in (best, out_dir):
        try:
            os.rmdir(folder)  # only when empty
        except OSError:
            pass
    return freed


def split_indices(n: int, fractions=(0.5, 0.1, 0.4), seed: int = 0) -> tuple:
    """Seeded split of range(n) into (train, dev, test) index lists (each sorted)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return sorted(idx[:a]), sorted(idx[a:b]), sorted(idx[b:])
