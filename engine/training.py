"""Router training on cached features (MSA.md section 6; issue 4).

The backbone is frozen and a router is linear, so everything a router ever reads can be cached once:
- documents: the chunk-pooled normalised layer inputs H̄ [L, C, hidden] of every routing layer (pooling
  commutes with a linear map: K̄_R = mean_pool(H) W_KR^T = mean_pool(H W_KR^T));
- queries: the normalised layer inputs of the question's own tokens [L, T, hidden], computed exactly as
  `Encoder.question_states` does (chat-template prompt, question tokens only).
A `FeatureCache` holds both (saved as safetensors + JSON); training and evaluation then touch only the
router and cached tensors, never the model. Scores are the routing score of MSA.md section 3 (cosine,
head-mean, max over question tokens, max over a document's chunks).

Loss: InfoNCE (tau 0.1) over document scores, per routing layer and on the layer-mean score; negatives are
every other document of the bank (which includes the hardest ones), or, for banks above `max_negatives`
documents, mined hard negatives (top-scored wrong documents under the current router) plus random ones.
Training data: supervised (query, gold documents) pairs and unsupervised inverse-cloze pairs (a title or
a sentence of a document as the query, that document as the positive), combinable.
"""

from __future__ import annotations

import json
import os
import shutil
import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .router import Router

CACHE_FORMAT_VERSION = 1
INITS = ("qk", "tied-random", "identity", "random")


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

    def add_queries(self, texts: list, inputs: list, positives: list, kind: str = "question") -> None:
        """inputs: per query [L, T, hidden]."""
        if not (len(texts) == len(inputs) == len(positives)):
            raise ValueError("texts, inputs and positives must have the same length")
        if not texts:
            return
        lengths = torch.tensor([x.shape[1] for x in inputs], dtype=torch.long)
        new = torch.cat(inputs, dim=1).to(self.inputs.dtype)
        self.q_inputs = new if self.q_inputs is None else torch.cat([self.q_inputs, new], dim=1)
        self.q_start = torch.cat([self.q_start, self.q_start[-1] + lengths.cumsum(0)])
        self.q_text.extend(texts)
        self.q_kind.extend([kind] * len(texts))
        self.q_pos.extend([list(map(int, p)) for p in positives])

    def query_indices(self, kinds: Optional[Iterable[str]] = None) -> list:
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

    def save(self, directory: str, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        # Written into a fresh folder that then replaces the old one: a crash leaves the old cache, or none
        # (then it is rebuilt), never a features.json beside another run's tensors.
        directory = os.path.normpath(directory)
        tmp = f"{directory}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        t = {"inputs": self.inputs.to("cpu", dtype).contiguous(), "doc_start": self.doc_start.cpu().contiguous(),
             "chunk_doc": self.chunk_doc.cpu().contiguous(), "q_start": self.q_start.cpu().contiguous()}
        if self.q_inputs is not None:
            t["q_inputs"] = self.q_inputs.to("cpu", dtype).contiguous()
        save_file(t, os.path.join(tmp, "features.safetensors"))
        with open(os.path.join(tmp, "features.json"), "w") as f:
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
        from safetensors.torch import load_file

        with open(os.path.join(directory, "features.json")) as f:
            m = json.load(f)
        if m.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"feature cache {directory!r}: format {m.get('format_version')} "
                             f"(this version reads {CACHE_FORMAT_VERSION})")
        t = load_file(os.path.join(directory, "features.safetensors"))
        return cls(m["layers"], m["doc_ids"], t["doc_start"], t["chunk_doc"], t["inputs"].to(dtype),
                   m["q_text"], m["q_kind"], m["q_pos"], t["q_start"],
                   t["q_inputs"].to(dtype) if "q_inputs" in t else None, m.get("meta", {}))

    @staticmethod
    def exists(directory: str) -> bool:
        return os.path.isfile(os.path.join(directory, "features.json")) and \
            os.path.isfile(os.path.join(directory, "features.safetensors"))


def model_fingerprint(engine) -> dict:
    fp = engine.fingerprint()
    return {k: fp[k] for k in ("model", "config_hash", "weights_hash", "chunk_size", "routing_layers")}


def build_bank_features(engine, texts: list, ids: list, progress: bool = True) -> FeatureCache:
    """Encode `texts` into the engine's memory (keep_inputs) and return their cached pooled inputs.

    The engine's memory is left holding these documents (a bank the evaluation can query directly)."""
    if not engine.config.keep_inputs:
        raise ValueError("build the engine with keep_inputs=True to cache router features")
    if len(engine.memory):
        engine.delete(list(engine.memory.ids))
    engine.add(texts, ids=ids, progress=progress)
    s = engine.memory.state
    if len(s) != len(ids):
        raise ValueError("the memory split some documents (longer than max_doc_tokens); pass shorter documents")
    return FeatureCache(list(engine.routing_layers), list(s.ids), s.doc_start.cpu().clone(),
                        s.chunk_doc.cpu().clone(), s.inputs.float().cpu().clone(),
                        meta={"fingerprint": model_fingerprint(engine), "n_tokens": int(sum(s.n_tokens))})


@torch.inference_mode()
def question_inputs(engine, questions: list, batch_size: int = 64, progress: bool = True,
                    desc: str = "queries") -> list:
    """Per question: the normalised layer inputs of its own tokens on the routing layers [L, T, hidden].

    Equals `engine.encoder.question_states(build_prompt(...))[0]`, computed in batches: the chat-template
    prefix (identical for every question) is run once and its K/V reused; question tokens never see the
    template's suffix (causal), so the suffix is not run at all."""
    from .generation import build_prompt
    from .model import KVCache, LayerCapture

    m = engine.model
    layers = list(engine.routing_layers)
    last = max(layers)
    prompts = [build_prompt(m, q, system=engine.config.system_prompt) for q in questions]
    out = [None] * len(questions)
    groups = {}  # prefix ids -> list of (index, question token ids)
    for i, p in enumerate(prompts):
        start = p.question_mask.index(True) if True in p.question_mask else len(p.ids)
        n = sum(p.question_mask)
        if n == 0:
            raise ValueError(f"question {questions[i]!r} has no tokens")
        groups.setdefault(tuple(p.ids[:start]), []).append((i, p.ids[start:start + n]))
    bar = tqdm(total=len(questions), desc=desc, disable=not progress, leave=False)
    for prefix, items in groups.items():
        Tp = len(prefix)
        pk, pv = {}, {}

        def cap_prefix(c: LayerCapture):
            pk[c.layer], pv[c.layer] = c.k, c.v

        if Tp:
            m.forward(torch.tensor([list(prefix)]), torch.arange(Tp)[None], capture=cap_prefix, last_layer=last)
        items = sorted(items, key=lambda x: -len(x[1]))
        for b0 in range(0, len(items), batch_size):
            batch = items[b0:b0 + batch_size]
            B, S = len(batch), max(len(t) for _, t in batch)
            ids = torch.zeros(B, S, dtype=torch.long)
            for b, (_, t) in enumerate(batch):
                ids[b, :len(t)] = torch.tensor(t)
            cache = None
            if Tp:
                mem = [None] * m.n_layers
                for l in range(last + 1):
                    mem[l] = (pk[l].expand(B, -1, -1, -1), pv[l].expand(B, -1, -1, -1))
                cache = KVCache(m.n_layers, memory=mem)
            hs = {}

            def cap(c: LayerCapture):
                if c.layer in layers:
                    hs[c.layer] = c.h_norm.float()

            m.forward(ids, (Tp + torch.arange(S))[None].expand(B, S), cache=cache, capture=cap, last_layer=last)
            for b, (i, t) in enumerate(batch):
                out[i] = torch.stack([hs[l][b, :len(t)] for l in layers]).cpu()
            bar.update(B)
    bar.close()
    return out


def build_cache(engine, docs: Sequence, questions: Sequence = (), ict_per_doc: int = 2, ict_titles: bool = True,
                seed: int = 0, progress: bool = True, batch_size: int = 64) -> FeatureCache:
    """One call for a corpus: docs = (id, title, text) triples (the bank text is "title\ntext" when a title
    is given), questions = (question, [gold doc ids]) pairs (kind "question"), plus inverse-cloze pairs
    from the docs (kinds "ict-title", "ict-sentence")."""
    texts = [f"{t}\n{x}" if t else x for _, t, x in docs]
    cache = build_bank_features(engine, texts, [d for d, _, _ in docs], progress=progress)
    row = cache.row_of()
    qs = [(q, [row[g] for g in gold if g in row]) for q, gold in questions]
    if qs:
        feats = question_inputs(engine, [q for q, _ in qs], batch_size=batch_size, progress=progress, desc="questions")
        cache.add_queries([q for q, _ in qs], feats, [p for _, p in qs], kind="question")
    if ict_per_doc or ict_titles:
        pairs = inverse_cloze_pairs([(row[d], t, x) for d, t, x in docs], ict_per_doc, ict_titles, seed)
        feats = question_inputs(engine, [q for q, _, _ in pairs], batch_size=batch_size, progress=progress,
                                desc="inverse-cloze queries")
        for kind in ("ict-title", "ict-sentence"):
            sel = [i for i, p in enumerate(pairs) if p[2] == kind]
            cache.add_queries([pairs[i][0] for i in sel], [feats[i] for i in sel], [pairs[i][1] for i in sel], kind)
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
            raise ValueError(f"unknown init {init!r}; use one of {INITS}")
    return wq, wk


class TrainableRouter(torch.nn.Module):
    """Per-layer W_QR / W_KR as parameters; scores queries against a cached bank (MSA.md section 3)."""

    def __init__(self, wq: dict, wk: dict, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.layers = sorted(wq)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = torch.nn.ParameterList([torch.nn.Parameter(wq[l].detach().float().clone()) for l in self.layers])
        self.wk = torch.nn.ParameterList([torch.nn.Parameter(wk[l].detach().float().clone()) for l in self.layers])

    @classmethod
    def from_router(cls, router: Router) -> "TrainableRouter":
        return cls(router.wq, router.wk, router.n_heads, router.n_kv_heads, router.head_dim)

    def to_router(self, meta: Optional[dict] = None) -> Router:
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
            tokmax = torch.full((B, s.shape[1]), float("-inf"), device=dev, dtype=s.dtype)
            tokmax = tokmax.scatter_reduce(0, seg[:, None].expand_as(s), s, reduce="amax", include_self=True)
            doc = torch.full((B, n_docs), float("-inf"), device=dev, dtype=s.dtype)
            doc = doc.scatter_reduce(1, chunk_doc[None].expand(B, -1), tokmax, reduce="amax", include_self=True)
            out.append(doc)
        return torch.stack(out)  # [L, B, N']


def infonce(scores: torch.Tensor, pos_mask: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (MSA.md section 6). scores [B, N], pos_mask [B, N] bool.

    Per positive p: -log(exp(s_p/tau) / (exp(s_p/tau) + sum over negatives exp(s_j/tau))), averaged over a
    query's positives, then over queries."""
    z = scores / tau
    neg = z.masked_fill(pos_mask, float("-inf"))
    neg_lse = torch.logsumexp(neg, dim=1, keepdim=True)  # [B, 1]
    per_pos = -(z - torch.logaddexp(z, neg_lse))  # [B, N]
    per_pos = per_pos.masked_fill(~pos_mask, 0.0)
    n_pos = pos_mask.sum(1).clamp_min(1)
    return (per_pos.sum(1) / n_pos).mean()


def routing_loss(scores: torch.Tensor, pos_mask: torch.Tensor, tau: float = 0.1, layer_weight: float = 1.0,
                 mean_weight: float = 1.0) -> torch.Tensor:
    """scores [L, B, N]: InfoNCE per layer (averaged) + InfoNCE on the layer-mean score."""
    per_layer = torch.stack([infonce(scores[i], pos_mask, tau) for i in range(scores.shape[0])]).mean()
    return layer_weight * per_layer + mean_weight * infonce(scores.mean(0), pos_mask, tau)


# ====================================================================== metrics
def retrieval_metrics(rankings: Sequence[Sequence], golds: Sequence[Sequence], ks=(1, 5, 10)) -> dict:
    """recall@k = |gold ∩ top k| / |gold| (as integrations/ragas/metrics.py), MRR = 1 / rank of the first
    gold document; averaged over questions with gold documents."""
    res = {f"recall@{k}": 0.0 for k in ks}
    res["mrr"] = 0.0
    n = 0
    for ranked, gold in zip(rankings, golds):
        gold = set(gold)
        if not gold:
            continue
        n += 1
        ranked = list(ranked)
        for k in ks:
            res[f"recall@{k}"] += len(gold & set(ranked[:k])) / len(gold)
        for r, d in enumerate(ranked, 1):
            if d in gold:
                res["mrr"] += 1.0 / r
                break
    return {k: (v / n if n else float("nan")) for k, v in res.items()} | {"n_questions": n}


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
    if isinstance(router, Router):
        router = TrainableRouter.from_router(router)
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
    device: str = "cpu"
    progress: bool = True


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


def train_router(caches, train: Sequence, dev: Optional[Sequence] = None, model=None,
                 config: Optional[TrainConfig] = None, out_dir: Optional[str] = None, resume: bool = True,
                 init_router: Optional[Router] = None, meta: Optional[dict] = None, log=print) -> tuple:
    """Train a router on cached features.

    caches: a FeatureCache or a list of them (each query scores against its own cache's bank).
    train / dev: lists of (cache index, query index) pairs (a plain list of ints means cache 0).
    model: the DecoderModel (for shapes and the `qk` init); or pass init_router.
    out_dir: checkpoint folder (`checkpoint.pt` each epoch, `best/` the best router so far); with
    resume=True an existing checkpoint continues where it stopped.
    Returns (best Router, history list of per-epoch dicts)."""
    cfg = config or TrainConfig()
    caches = caches if isinstance(caches, (list, tuple)) else [caches]
    norm = lambda xs: [x if isinstance(x, tuple) else (0, int(x)) for x in (xs or [])]  # noqa: E731
    train, dev = norm(train), norm(dev)
    if not train:
        raise ValueError("no training pairs")
    layers = caches[0].layers
    torch.manual_seed(cfg.seed)
    if init_router is not None:
        tr = TrainableRouter.from_router(init_router)
    else:
        if model is None:
            raise ValueError("pass the model (for its shapes and q/k projections) or init_router")
        wq, wk = init_router_weights(model, layers, cfg.init, cfg.seed)
        tr = TrainableRouter(wq, wk, model.n_heads, model.n_kv_heads, model.head_dim)
    tr = tr.to(cfg.device)
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = dict(meta or {}, train_config={k: v for k, v in cfg.__dict__.items() if k != "progress"},
                layers=layers, n_train=len(train), n_dev=len(dev))
    history, start_epoch, best, best_state, bad = [], 0, -1.0, None, 0
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    if ckpt and resume and os.path.isfile(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        same = {k: v for k, v in cfg.__dict__.items() if k not in ("epochs", "progress", "patience", "device")}
        saved = {k: st.get("config", {}).get(k) for k in same}
        if saved != same:
            raise ValueError(f"checkpoint {ckpt} was written with other settings ({saved} vs {same}); "
                             "resume with the same settings, pass resume=False, or use another out_dir")
        tr.load_state_dict(st["router"])
        opt.load_state_dict(st["opt"])
        history, start_epoch, best, bad = st["history"], st["epoch"] + 1, st["best"], st["bad"]
        best_state = st["best_state"]
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
        log(f"epoch 0 (init {cfg.init}): dev " + " ".join(f"{k} {v:.3f}" for k, v in m0.items()))
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
            doc_rows = None
            if c.n_docs > cfg.max_negatives:
                doc_rows = _sample_docs(tr, c, qb, cfg, rng)
            scores = tr.scores(c, qb, doc_rows=doc_rows)
            loss = routing_loss(scores, _pos_mask(c, qb, doc_rows, scores.device), cfg.tau,
                                cfg.layer_weight, cfg.mean_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(qb)
            n += len(qb)
            bar.set_postfix(loss=f"{tot / n:.4f}")
        m = dev_metrics()
        rec = {"epoch": epoch + 1, "loss": tot / max(n, 1), **{f"dev_{k}": v for k, v in m.items()}}
        history.append(rec)
        log(f"epoch {epoch + 1}: loss {rec['loss']:.4f}" + ("" if not m else " dev " + " ".join(
            f"{k} {v:.3f}" for k, v in m.items())))
        score = m.get("mrr", -rec["loss"])
        if score > best:
            best, bad = score, 0
            best_state = {k: v.detach().cpu().clone() for k, v in tr.state_dict().items()}
        else:
            bad += 1
        if ckpt:
            os.makedirs(out_dir, exist_ok=True)
            torch.save({"router": tr.state_dict(), "opt": opt.state_dict(), "history": history, "epoch": epoch,
                        "best": best, "bad": bad, "best_state": best_state, "config": dict(cfg.__dict__)},
                       ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        if dev and bad >= cfg.patience:
            log(f"early stop after epoch {epoch + 1} (no dev MRR gain for {cfg.patience} epochs)")
            break
    if best_state is not None:
        tr.load_state_dict(best_state)
    router = tr.to_router(meta=dict(meta, history=history))
    if out_dir:
        router.save(os.path.join(out_dir, "best"))
    return router, history


@torch.no_grad()
def _sample_docs(tr, cache, qb, cfg, rng) -> torch.Tensor:
    """Positives + mined hard negatives (top-scored under the current router) + random documents."""
    s = tr.scores(cache, qb).mean(0)  # [B, N]
    hard = s.topk(min(cfg.hard_negatives, s.shape[1]), dim=1).indices.flatten().cpu().tolist()
    pos = [p for q in qb for p in cache.q_pos[q]]
    n_rand = max(0, cfg.max_negatives - len(set(hard)) - len(pos))
    rand = rng.sample(range(cache.n_docs), min(n_rand, cache.n_docs))
    return torch.tensor(sorted(set(pos) | set(hard) | set(rand)), dtype=torch.long)


def export_msa4b(router: Router, path: str) -> None:
    """Write the router's projectors under MSA-4B weight names into one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in router.to_msa4b_state_dict().items()}, path,
              metadata={"format": "msa4b-router", "n_heads": str(router.n_heads),
                        "n_kv_heads": str(router.n_kv_heads), "head_dim": str(router.head_dim)})


def split_indices(n: int, fractions=(0.5, 0.1, 0.4), seed: int = 0) -> tuple:
    """Seeded split of range(n) into (train, dev, test) index lists (each sorted)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    a = int(round(fractions[0] * n))
    b = a + int(round(fractions[1] * n))
    return sorted(idx[:a]), sorted(idx[a:b]), sorted(idx[b:])
