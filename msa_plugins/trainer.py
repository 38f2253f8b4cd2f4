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
from dataclasses import dataclass
from typing import Optional, Sequence

from .engine.router import Router
from .engine.training import (INITS, FeatureCache, TrainableRouter, TrainConfig, build_cache, evaluate,
                              export_msa4b, init_router_weights, rank_documents, split_indices)
from .engine.training import train_router as _train_on_features
from .errors import InvalidArgumentError, InvalidTypeError
from .metrics import retrieval_metrics

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainingResult", "FeatureCache", "Router", "INITS", "train_router_for", "build_features",
           "load_or_build_features", "train", "split_queries", "split_indices", "evaluate", "rank",
           "training_free_router", "export_msa4b", "retrieval_metrics", "normalise_docs", "check_out_dir"]


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
    fp = engine.fingerprint()
    return {k: fp[k] for k in ("model", "config_hash", "weights_hash", "tokenizer_hash", "chunk_size",
                               "routing_layers")}


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
    cache = build_cache(_model(engine), engine.routing_layers, cfg.chunk_size, docs, questions,
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
    pairs when there are no questions), and only when there are at least 10 to draw from."""
    _check_dev_fraction(dev_fraction)
    q, ict = cache.query_indices(["question"]), cache.query_indices(["ict"])
    pool = list(q) if q else list(ict)
    random.Random(seed).shuffle(pool)
    n_dev = int(len(pool) * dev_fraction) if len(pool) >= 10 else 0
    dev = sorted(pool[:n_dev])
    return sorted(set(q + ict) - set(dev)), dev


# ---------------------------------------------------------------------- training and evaluation
def train(engine, caches, train_queries: Sequence, dev_queries: Optional[Sequence] = None, *,
          config: Optional[TrainConfig] = None, out: Optional[str] = None, resume: bool = True,
          meta: Optional[dict] = None, init_router: Optional[Router] = None) -> tuple:
    """Train on feature caches (see `engine.training.train_router` for the query index formats) with the
    engine's model for shapes and the `qk` init -> (Router, history). `out`: checkpoint folder."""
    model = _model(engine)
    config = config or TrainConfig()
    meta = {"model": engine.model_name, "model_config_hash": engine.fingerprint()["config_hash"],
            "chunk_size": engine.config.chunk_size, "score": engine.config.score, **(meta or {})}
    return _train_on_features(caches, train_queries, dev_queries, model=model, config=config, out_dir=out,
                              resume=resume, init_router=init_router, meta=meta)


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


def train_router_for(engine, docs=None, questions=(), *, out: Optional[str] = None,
                     config: Optional[TrainConfig] = None, dev_fraction: float = 0.1, ict_per_doc: int = 2,
                     ict_titles: bool = True, resume: bool = True, export_msa4b_path: Optional[str] = None,
                     progress: bool = True) -> TrainingResult:
    """Train a router adapter for `engine`'s model on a corpus (and optional supervised questions).

    out: the adapter folder (also keeps `features/` and `train/` checkpoints, reused when `resume` and
    built from the same data and settings); None trains in memory only. config: `TrainConfig` (device:
    the engine's by default; its `progress` is replaced by `progress`). export_msa4b_path: also write one
    safetensors file with MSA-4B weight names. The engine itself is not changed: pass `result.router`
    to `engine.set_router` to use it."""
    config = dataclasses.replace(config or TrainConfig(), progress=progress)
    _check_dev_fraction(dev_fraction)
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
    meta = {"corpus_documents": len(docs), "questions": len(cache.query_indices(["question"])),
            "inverse_cloze_queries": len(cache.query_indices(["ict"]))}
    router, history = train(engine, cache, train_q, dev_q, config=config,
                            out=os.path.join(out, "train") if out else None, resume=resume, meta=meta)
    if out is not None:
        router.save(out)
    if export_msa4b_path:
        export_msa4b(router, export_msa4b_path)
    return TrainingResult(router, history, len(train_q), len(dev_q), out)
