"""The bad-input catalogue: what a careless or hostile caller can hand us, on every surface (Python API,
configuration, storage format, CLI, LlamaIndex, LangChain). Each case asserts
  - the error type (an `MSAError` subclass that keeps the builtin base a caller would catch),
  - that the message names the problem (a substring),
  - and that the memory is unchanged, in RAM (ids, texts, metadata) and on disk (every file's bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa_plugins import (AnswerOptions, DocumentNotFoundError, DuplicateIdError, EmptyMemoryError, InputTooLongError,
                         InvalidArgumentError, InvalidTypeError, MemoryFormatError, MSAConfig, MSAEngine, MSAError,
                         PathNotFoundError, RouterMismatchError, UnsupportedModelError)

DOCS = ["Alice was born in Lisbon and moved to Paris.", "The Varnholm lighthouse was built by Ada Brenn.",
        "Bob keeps bees in his garden."]
IDS = ["alice", "lighthouse", "bob"]
META = [{"topic": "people", "year": 1990}, {"topic": "places"}, {"topic": "people"}]


@pytest.fixture(scope="module")
def engine_and_dir(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("bad_input")
    model_dir = make_tiny_model("llama", str(root / "model"))
    engine = MSAEngine.from_pretrained(model_dir, device="cpu", chunk_size=4, k=2, max_new_tokens=3)
    engine.add(DOCS, ids=IDS, metadata=META, progress=False)
    memory_dir = root / "memory"
    engine.save(str(memory_dir))
    return engine, memory_dir, model_dir


def _ram(engine) -> list:
    return [(d.id, d.text, json.dumps(d.metadata, sort_keys=True)) for d in engine.snapshot().documents()]


def _disk(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _check(engine_and_dir, call, error, words):
    engine, memory_dir, _ = engine_and_dir
    ram, disk = _ram(engine), _disk(memory_dir)
    with pytest.raises(error) as info:
        call(engine, memory_dir)
    assert isinstance(info.value, MSAError), f"{type(info.value).__name__} is not an MSAError: {info.value}"
    message = str(info.value).lower()
    for word in ([words] if isinstance(words, str) else words):
        assert word.lower() in message, f"{word!r} not in {message!r}"
    assert _ram(engine) == ram, "the memory in RAM changed"
    assert _disk(memory_dir) == disk, "the memory on disk changed"


def _case(name, call, error, words):
    return pytest.param(call, error, words, id=name)


NAN = float("nan")

# ---------------------------------------------------------------- adding documents
ADD_CASES = [
    _case("add-one-string", lambda e, d: e.add("just one text"), InvalidTypeError, "single string"),
    _case("add-bytes", lambda e, d: e.add(b"bytes"), InvalidTypeError, "single string"),
    _case("add-none", lambda e, d: e.add(None), InvalidTypeError, "texts"),
    _case("add-int", lambda e, d: e.add(5), InvalidTypeError, "texts"),
    _case("add-int-item", lambda e, d: e.add([1]), InvalidTypeError, "position 0"),
    _case("add-bytes-item", lambda e, d: e.add([b"x"]), InvalidTypeError, "position 0"),
    _case("add-empty-text", lambda e, d: e.add([""]), InvalidArgumentError, "empty"),
    _case("add-blank-text", lambda e, d: e.add(["ok text", "  \n"]), InvalidArgumentError, ["position 1", "empty"]),
    _case("add-ids-count", lambda e, d: e.add(["a text"], ids=["x", "y"]), InvalidArgumentError, "ids"),
    _case("add-ids-string", lambda e, d: e.add(["a text"], ids="x"), InvalidTypeError, "ids"),
    _case("add-id-int", lambda e, d: e.add(["a text"], ids=[3]), InvalidTypeError, "id"),
    _case("add-id-empty", lambda e, d: e.add(["a text"], ids=[""]), InvalidTypeError, "id"),
    _case("add-id-hash", lambda e, d: e.add(["a text"], ids=["L#0"]), InvalidArgumentError, "#"),
    _case("add-id-duplicate-in-call", lambda e, d: e.add(["t one", "t two"], ids=["n", "n"]), DuplicateIdError, "duplicate"),
    _case("add-id-exists", lambda e, d: e.add(["another text"], ids=["alice"]), DuplicateIdError, "alice"),
    _case("add-metadata-dict", lambda e, d: e.add(["a text"], metadata={"a": 1}), InvalidTypeError, "metadata"),
    _case("add-metadata-count", lambda e, d: e.add(["a text"], metadata=[{}, {}]), InvalidArgumentError, "metadata"),
    _case("add-metadata-str", lambda e, d: e.add(["a text"], metadata=["x"]), InvalidTypeError, "metadata"),
    _case("add-metadata-int-key", lambda e, d: e.add(["a text"], metadata=[{1: "a"}]), InvalidTypeError, "key"),
    _case("add-metadata-tuple", lambda e, d: e.add(["a text"], metadata=[{"a": (1, 2)}]), InvalidTypeError, "tuple"),
    _case("add-metadata-set", lambda e, d: e.add(["a text"], metadata=[{"a": {1}}]), InvalidTypeError, "set"),
    _case("add-metadata-nan", lambda e, d: e.add(["a text"], metadata=[{"a": NAN}]), InvalidTypeError, "metadata"),
    _case("add-metadata-inf", lambda e, d: e.add(["a text"], metadata=[{"a": float("inf")}]), InvalidTypeError, "metadata"),
    _case("add-metadata-object", lambda e, d: e.add(["a text"], metadata=[{"a": object()}]), InvalidTypeError, "metadata"),
    _case("add-metadata-bytes", lambda e, d: e.add(["a text"], metadata=[{"a": b"x"}]), InvalidTypeError, "bytes"),
    _case("add-metadata-nested-bad", lambda e, d: e.add(["a text"], metadata=[{"a": {"b": (1,)}}]), InvalidTypeError,
          "metadata"),
    _case("add-second-bad-keeps-first", lambda e, d: e.add(["fine text", 7], ids=["f1", "f2"]), InvalidTypeError,
          "position 1"),
    _case("upsert-ids-count", lambda e, d: e.upsert(["a text"], ids=["alice", "bob"]), InvalidArgumentError, "ids"),
    _case("upsert-empty-text", lambda e, d: e.upsert([""], ids=["alice"]), InvalidArgumentError, "empty"),
    _case("upsert-bad-metadata", lambda e, d: e.upsert(["new text"], ids=["alice"], metadata=[{"a": (1,)}]),
          InvalidTypeError, "metadata"),
    _case("upsert-duplicate-in-call", lambda e, d: e.upsert(["a", "b"], ids=["alice", "alice"]), DuplicateIdError,
          "duplicate"),
    # a lone surrogate (bytes decoded with surrogateescape) used to be accepted by add and fail every later save
    _case("add-text-lone-surrogate", lambda e, d: e.add(["bad \ud800 text"]), InvalidArgumentError,
          ["position 0", "lone surrogate"]),
    _case("add-id-lone-surrogate", lambda e, d: e.add(["a text"], ids=["id\udc80"]), InvalidArgumentError,
          "lone surrogate"),
    _case("add-metadata-lone-surrogate", lambda e, d: e.add(["a text"], metadata=[{"note": "bad \ud800"}]),
          InvalidTypeError, ["metadata", "lone surrogate"]),
    _case("add-metadata-key-lone-surrogate", lambda e, d: e.add(["a text"], metadata=[{"k\ud800": 1}]),
          InvalidTypeError, "surrogate"),
    _case("add-collection-lone-surrogate", lambda e, d: e.add(["a text"], collection="c\ud800"),
          InvalidArgumentError, "lone surrogate"),
    _case("upsert-text-lone-surrogate", lambda e, d: e.upsert(["bad \udc80"], ids=["alice"]), InvalidArgumentError,
          "lone surrogate"),
    # a set pairs ids with texts in hash order; a dict iterates its keys ({id: text} would store the ids as texts)
    _case("add-ids-set", lambda e, d: e.add(["t one", "t two"], ids={"s1", "s2"}), InvalidTypeError, "ordered"),
    _case("add-texts-set", lambda e, d: e.add({"t one", "t two"}), InvalidTypeError, "ordered"),
    _case("add-texts-dict", lambda e, d: e.add({"k1": "t one"}), InvalidTypeError, "ordered"),
    _case("add-metadata-set", lambda e, d: e.add(["t one"], metadata=frozenset()), InvalidTypeError, "ordered"),
    _case("upsert-ids-set", lambda e, d: e.upsert(["t one", "t two"], ids={"alice", "bob"}), InvalidTypeError,
          "ordered"),
    _case("delete-unknown", lambda e, d: e.delete(["nobody"]), DocumentNotFoundError, "nobody"),
    _case("delete-unknown-among-known", lambda e, d: e.delete(["alice", "nobody"]), DocumentNotFoundError, "nobody"),
    _case("get-unknown", lambda e, d: e.get(["nobody"]), DocumentNotFoundError, "nobody"),
]

# ---------------------------------------------------------------- questions and answer options
QUESTION = "Where was Alice born?"
ASK_CASES = [
    _case("question-none", lambda e, d: e.query(None), InvalidTypeError, "question"),
    _case("question-int", lambda e, d: e.query(42), InvalidTypeError, "question"),
    _case("question-bytes", lambda e, d: e.query(b"where?"), InvalidTypeError, "question"),
    _case("question-empty", lambda e, d: e.query(""), InvalidArgumentError, "empty"),
    _case("question-blank", lambda e, d: e.query(" \t\n"), InvalidArgumentError, "empty"),
    _case("question-huge-chars", lambda e, d: e.query("x" * 1_100_000), InputTooLongError, "characters"),
    _case("question-over-window", lambda e, d: e.query("word " * 3000), InputTooLongError, "tokens"),
    _case("retrieve-question-over-window", lambda e, d: e.retrieve("word " * 3000), InputTooLongError, "tokens"),
    _case("stream-question-over-window", lambda e, d: e.stream("word " * 3000), InputTooLongError, "tokens"),
    _case("k-zero", lambda e, d: e.query(QUESTION, k=0), InvalidArgumentError, "k must be >= 1"),
    _case("k-negative", lambda e, d: e.query(QUESTION, k=-2), InvalidArgumentError, "k must be >= 1"),
    _case("k-float", lambda e, d: e.query(QUESTION, k=2.5), InvalidTypeError, "k must be an int"),
    _case("k-string", lambda e, d: e.query(QUESTION, k="3"), InvalidTypeError, "k must be an int"),
    _case("k-bool", lambda e, d: e.query(QUESTION, k=True), InvalidTypeError, "k must be an int"),
    _case("retrieve-k-zero", lambda e, d: e.retrieve(QUESTION, k=0), InvalidArgumentError, "k"),
    _case("retrieve-k-string", lambda e, d: e.retrieve(QUESTION, k="2"), InvalidTypeError, "k"),
    _case("max-new-negative", lambda e, d: e.query(QUESTION, max_new_tokens=-1), InvalidArgumentError, "max_new_tokens"),
    _case("max-new-zero", lambda e, d: e.query(QUESTION, max_new_tokens=0), InvalidArgumentError, "max_new_tokens"),
    _case("max-new-string", lambda e, d: e.query(QUESTION, max_new_tokens="5"), InvalidTypeError, "max_new_tokens"),
    _case("max-new-float", lambda e, d: e.query(QUESTION, max_new_tokens=1.5), InvalidTypeError, "max_new_tokens"),
    _case("max-new-over-window", lambda e, d: e.query(QUESTION, max_new_tokens=10 ** 6), InputTooLongError, "window"),
    _case("temperature-nan", lambda e, d: e.query(QUESTION, temperature=NAN), InvalidArgumentError, "temperature"),
    _case("temperature-negative", lambda e, d: e.query(QUESTION, temperature=-0.5), InvalidArgumentError, "temperature"),
    _case("temperature-inf", lambda e, d: e.query(QUESTION, temperature=math.inf), InvalidArgumentError, "temperature"),
    _case("temperature-string", lambda e, d: e.query(QUESTION, temperature="hot"), InvalidTypeError, "temperature"),
    _case("mode-unknown", lambda e, d: e.query(QUESTION, mode="fast"), InvalidArgumentError, "mode"),
    _case("mode-int", lambda e, d: e.query(QUESTION, mode=1), InvalidArgumentError, "mode"),
    _case("mode-protocol-untrained", lambda e, d: e.query(QUESTION, mode="protocol"), InvalidArgumentError, "protocol"),
    _case("rounds-zero", lambda e, d: e.query(QUESTION, rounds=0), InvalidArgumentError, "rounds"),
    _case("k-per-round-string", lambda e, d: e.query(QUESTION, k_per_round="no"), InvalidTypeError, "k_per_round"),
    _case("rounds-over-max-rounds", lambda e, d: e.query(QUESTION, rounds=5), InvalidArgumentError, "max_rounds=4"),
    _case("retrieve-k-per-round-string", lambda e, d: e.retrieve(QUESTION, rounds=2, k_per_round="yes"),
          InvalidTypeError, "k_per_round"),
    _case("retrieve-routing-unknown", lambda e, d: e.retrieve(QUESTION, routing="dense"), InvalidArgumentError,
          "routing"),
    _case("retrieve-rounds-over-max-rounds", lambda e, d: e.retrieve(QUESTION, rounds=5), InvalidArgumentError,
          "max_rounds=4"),
    _case("rounds-in-sparse-mode", lambda e, d: e.query(QUESTION, rounds=2, mode="sparse"), InvalidArgumentError,
          "interleave"),
    _case("question-lone-surrogate", lambda e, d: e.query("Where \ud800 was Alice born?"), InvalidArgumentError,
          "lone surrogate"),
    _case("seed-string", lambda e, d: e.query(QUESTION, seed="x"), InvalidTypeError, "seed"),
    _case("stop-empty-string", lambda e, d: e.query(QUESTION, stop=[""]), InvalidArgumentError, "stop"),
    _case("stop-int", lambda e, d: e.query(QUESTION, stop=5), InvalidTypeError, "stop"),
    _case("stop-int-item", lambda e, d: e.query(QUESTION, stop=[1]), InvalidArgumentError, "stop"),
    _case("prompt-style-unknown", lambda e, d: e.query(QUESTION, prompt_style="fancy"), InvalidArgumentError,
          "prompt_style"),
    _case("system-int", lambda e, d: e.query(QUESTION, system=3), InvalidTypeError, "system"),
    _case("unknown-option", lambda e, d: e.query(QUESTION, top_p=0.9), InvalidTypeError, "top_p"),
    _case("options-wrong-type", lambda e, d: e.query(QUESTION, options={"k": 2}), InvalidTypeError, "options"),
    _case("where-string", lambda e, d: e.query(QUESTION, where="ab"), InvalidTypeError, "not one string"),
    _case("where-int", lambda e, d: e.query(QUESTION, where=5), InvalidTypeError, "list of str"),
    _case("where-int-ids", lambda e, d: e.retrieve(QUESTION, where=[1, 2]), InvalidTypeError, "str"),
    _case("where-empty-list", lambda e, d: e.query(QUESTION, where=[]), InvalidArgumentError, "empty"),
    _case("history-string", lambda e, d: e.query(QUESTION, history="earlier"), InvalidTypeError, "messages"),
    _case("history-not-dicts", lambda e, d: e.query(QUESTION, history=[("user", "hi")]), InvalidTypeError, "message 0"),
    _case("history-bad-role", lambda e, d: e.query(QUESTION, history=[{"role": "robot", "content": "x"}]),
          InvalidArgumentError, "role"),
    _case("history-bad-content", lambda e, d: e.query(QUESTION, history=[{"role": "user", "content": 5}]),
          InvalidTypeError, "content"),
    _case("generate-no-messages", lambda e, d: e.generate([]), InvalidArgumentError, "no messages"),
    _case("generate-int", lambda e, d: e.generate(5), InvalidTypeError, "messages"),
    _case("generate-missing-content", lambda e, d: e.generate([{"role": "user"}]), InvalidTypeError, "content"),
    _case("generate-max-new-zero", lambda e, d: e.generate("hi", max_new_tokens=0), InvalidArgumentError,
          "max_new_tokens"),
    _case("generate-over-window", lambda e, d: e.generate("word " * 3000), InputTooLongError, "window"),
    _case("answer-from-string", lambda e, d: e.answer_from(QUESTION, "one text"), InvalidTypeError, "texts"),
    _case("answer-from-empty-text", lambda e, d: e.answer_from(QUESTION, [""]), InvalidArgumentError, "empty"),
    _case("answer-from-int-text", lambda e, d: e.answer_from(QUESTION, [5]), InvalidTypeError, "text"),
    _case("count-tokens-int", lambda e, d: e.count_tokens(5), InvalidTypeError, "text"),
]


def _empty_engine(engine):
    return MSAEngine(engine.model, router=None, config=engine.config)


# ---------------------------------------------------------------- configuration
def _load_cfg(d, **kw):
    return lambda e, dd: MSAEngine.from_pretrained(str(dd.parent / "model"), device="cpu", **kw)


CONFIG_CASES = [
    _case("chunk-size-zero", _load_cfg(None, chunk_size=0), InvalidArgumentError, "chunk_size"),
    _case("chunk-size-string", _load_cfg(None, chunk_size="4"), InvalidTypeError, "chunk_size"),
    _case("score-unknown", _load_cfg(None, score="l2"), InvalidArgumentError, "score"),
    _case("content-tier-unknown", _load_cfg(None, content_tier="disk"), InvalidArgumentError, "content_tier"),
    _case("routing-backend-unknown", _load_cfg(None, routing_backend="cuda"), InvalidArgumentError, "routing_backend"),
    _case("unknown-setting", _load_cfg(None, chunk=4), InvalidTypeError, "unknown setting"),
    _case("routing-layers-out-of-range", _load_cfg(None, routing_layers=[99]), InvalidArgumentError, "routing layers"),
    _case("routing-layers-string", _load_cfg(None, routing_layers="1"), InvalidTypeError, "routing_layers"),
    _case("routing-layers-empty", _load_cfg(None, routing_layers=[]), InvalidArgumentError, "routing_layers"),
    _case("keep-inputs-string", _load_cfg(None, keep_inputs="yes"), InvalidTypeError, "keep_inputs"),
    _case("batch-tokens-zero", _load_cfg(None, batch_tokens=0), InvalidArgumentError, "batch_tokens"),
    _case("max-doc-tokens-zero", _load_cfg(None, max_doc_tokens=0), InvalidArgumentError, "max_doc_tokens"),
    _case("default-k-zero", _load_cfg(None, k=0), InvalidArgumentError, "k must be >= 1"),
    _case("default-temperature-nan", _load_cfg(None, temperature=NAN), InvalidArgumentError, "temperature"),
    _case("answer-options-direct", lambda e, d: AnswerOptions(k="3"), InvalidTypeError, "k must be an int"),
    _case("config-direct", lambda e, d: MSAConfig(score="manhattan"), InvalidArgumentError, "score"),
    _case("model-folder-missing", lambda e, d: MSAEngine.from_pretrained(str(d.parent / "no-model"), device="cpu"),
          PathNotFoundError, "no-model"),
]


def _unsupported_family(e, d):
    folder = d.parent / "gpt2-like"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    MSAEngine.from_pretrained(str(folder), device="cpu")


def _remote_code(e, d):
    folder = d.parent / "remote-code"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    (folder / "x.py").write_text(f"open({str(d.parent / 'PWNED')!r}, 'w').close()\n")
    MSAEngine.from_pretrained(str(folder), device="cpu")


def _not_json_config(e, d):
    folder = d.parent / "bad-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{not json")
    MSAEngine.from_pretrained(str(folder), device="cpu")


MODEL_CASES = [
    _case("model-family-unsupported", _unsupported_family, UnsupportedModelError, "not supported"),
    _case("model-custom-code", _remote_code, UnsupportedModelError, "custom model code"),
    _case("model-config-not-json", _not_json_config, UnsupportedModelError, "not valid json"),
    _case("router-folder-missing", lambda e, d: e.set_router(str(d.parent / "no-router")), PathNotFoundError,
          "no-router"),
]


@pytest.mark.parametrize("call,error,words", ADD_CASES + ASK_CASES + CONFIG_CASES + MODEL_CASES)
def test_python_api_bad_input(engine_and_dir, call, error, words):
    _check(engine_and_dir, call, error, words)


def test_custom_model_code_never_runs(engine_and_dir):
    _, memory_dir, _ = engine_and_dir
    with pytest.raises(UnsupportedModelError):
        _remote_code(None, memory_dir)
    assert not (memory_dir.parent / "PWNED").exists()


def test_empty_memory_route_is_an_error_but_retrieve_is_empty(engine_and_dir):
    engine = _empty_engine(engine_and_dir[0])
    with pytest.raises(EmptyMemoryError, match="empty"):
        engine.route(QUESTION)
    assert engine.retrieve(QUESTION) == []
    # nothing to route to is no reason to skip the checks a full memory makes
    with pytest.raises(InvalidArgumentError, match="routing"):
        engine.retrieve(QUESTION, routing="dense")
    with pytest.raises(InvalidArgumentError, match="max_rounds"):
        engine.retrieve(QUESTION, rounds=5)
    assert engine.add([]) == []
    assert len(engine) == 0


# ---------------------------------------------------------------- storage format: loading a damaged copy
def _damaged_copy(d: Path, damage) -> str:
    import shutil

    copy = d.parent / f"damaged-{damage.__name__}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(d, copy)
    damage(copy)
    return str(copy)


def _files(folder, prefix):
    return [p for p in folder.iterdir() if p.name.startswith(prefix)]


def manifest_not_json(c):
    (c / "manifest.json").write_text("{truncated")


def manifest_wrong_version(c):
    m = json.loads((c / "manifest.json").read_text())
    m["format_version"] = 99
    (c / "manifest.json").write_text(json.dumps(m))


def manifest_missing_key(c):
    m = json.loads((c / "manifest.json").read_text())
    del m["documents"]
    (c / "manifest.json").write_text(json.dumps(m))


def tensors_truncated(c):
    t = _files(c, "tensors-")[0]
    t.write_bytes(t.read_bytes()[:-16])


def tensors_byte_flipped(c):
    t = _files(c, "tensors-")[0]
    data = bytearray(t.read_bytes())
    data[-5] ^= 0xFF
    t.write_bytes(bytes(data))


def docs_edited(c):
    dpath = _files(c, "docs-")[0]
    dpath.write_text(dpath.read_text().replace("Lisbon", "Madrid"))


def docs_missing(c):
    _files(c, "docs-")[0].unlink()


def manifest_names_other_file(c):
    m = json.loads((c / "manifest.json").read_text())
    m["tensors"]["file"] = "../../etc/passwd"
    (c / "manifest.json").write_text(json.dumps(m))


STORAGE_CASES = [
    _case(f"load-{fn.__name__}", (lambda fn: lambda e, d: e.load(_damaged_copy(d, fn)))(fn), MemoryFormatError, words)
    for fn, words in [(manifest_not_json, "manifest.json"), (manifest_wrong_version, "version"),
                      (manifest_missing_key, "documents"), (tensors_truncated, "tensors-"),
                      (tensors_byte_flipped, "checksum"), (docs_edited, "docs-"), (docs_missing, "missing"),
                      (manifest_names_other_file, "manifest")]
] + [
    _case("load-not-a-memory", lambda e, d: e.load(str(d.parent)), MemoryFormatError, "manifest.json"),
    _case("load-missing-folder", lambda e, d: e.load(str(d.parent / "nowhere")), (MemoryFormatError, PathNotFoundError),
          "nowhere"),
    _case("save-into-user-folder", lambda e, d: (_user_folder(d), e.save(str(d.parent / "user-notes"))),
          InvalidArgumentError, "no saved memory"),
]


def _user_folder(d: Path):
    notes = d.parent / "user-notes"
    notes.mkdir(exist_ok=True)
    (notes / "docs-2024-budget.md").write_text("my budget")


@pytest.mark.parametrize("call,error,words", STORAGE_CASES)
def test_storage_bad_input(engine_and_dir, call, error, words):
    _check(engine_and_dir, call, error, words)


def test_a_refused_save_leaves_the_users_files(engine_and_dir):
    _, memory_dir, _ = engine_and_dir
    with pytest.raises(InvalidArgumentError):
        _user_folder(memory_dir)
        engine_and_dir[0].save(str(memory_dir.parent / "user-notes"))
    assert (memory_dir.parent / "user-notes" / "docs-2024-budget.md").read_text() == "my budget"


# ---------------------------------------------------------------- LlamaIndex surface
def _li(fn):
    return lambda e, d: fn(e)


def _li_retriever(**kw):
    from msa_plugins.integrations.llama_index import MSARetriever

    return lambda e, d: MSARetriever(e, **kw)


def _li_filters(filters):
    def call(e, d):
        from msa_plugins.integrations.llama_index import MSARetriever

        return MSARetriever(e, filters=filters).retrieve(QUESTION)
    return call


def _li_query(question):
    def call(e, d):
        from msa_plugins.integrations.llama_index import MSAQueryEngine

        return MSAQueryEngine(e).query(question)
    return call


def _li_llm(**kw):
    def call(e, d):
        from msa_plugins.integrations.llama_index import MSALLM

        return MSALLM(engine=e, **kw).complete("hello")
    return call


def _li_insert(metadata):
    def call(e, d):
        from llama_index.core.schema import TextNode

        from msa_plugins.integrations.llama_index import MSAVectorStore

        return MSAVectorStore(e).add([TextNode(text="a new node text", id_="n1", metadata=metadata)])
    return call


def _meta_filters(key, value, operator="=="):
    from llama_index.core.vector_stores import MetadataFilter, MetadataFilters

    return MetadataFilters(filters=[MetadataFilter(key=key, value=value, operator=operator)])


LLAMA_INDEX_CASES = [
    _case("li-retriever-k-zero", _li_retriever(similarity_top_k=0), InvalidArgumentError, "k must be >= 1"),
    _case("li-retriever-k-string", _li_retriever(similarity_top_k="3"), InvalidTypeError, "k must be an int"),
    _case("li-retriever-rounds-zero", _li_retriever(rounds=0), InvalidArgumentError, "rounds must be >= 1"),
    _case("li-retriever-k-per-round-string", _li_retriever(rounds=2, k_per_round="yes"), InvalidTypeError,
          "k_per_round must be True or False"),
    _case("li-filters-in-scalar", lambda e, d: _li_filters(_meta_filters("topic", "people", "in"))(e, d),
          InvalidTypeError, "in"),
    _case("li-filters-not-filters", _li_filters(5), InvalidTypeError, "filters"),
    _case("li-query-empty", _li_query(""), InvalidArgumentError, "empty"),
    _case("li-query-over-window", _li_query("word " * 3000), InputTooLongError, "tokens"),
    _case("li-llm-max-new-negative", _li_llm(max_new_tokens=-1), InvalidArgumentError, "max_new_tokens"),
    _case("li-llm-temperature-nan", _li_llm(temperature=NAN), InvalidArgumentError, "temperature"),
    _case("li-retriever-k-float", _li_retriever(similarity_top_k=2.5), InvalidTypeError, "k must be an int"),
    _case("li-insert-id-with-hash", lambda e, d: __import__("msa_plugins.integrations.llama_index",
                                                           fromlist=["MSAVectorStore"]).MSAVectorStore(e).add(
        [__import__("llama_index.core.schema", fromlist=["TextNode"]).TextNode(text="text", id_="L#0")]),
        InvalidArgumentError, "#"),
]


def _li_filter_value_case():
    return _li_filters(_meta_filters("year", "not-a-number", ">"))


LLAMA_INDEX_CASES.append(_case("li-filter-uncomparable", _li_filter_value_case(), InvalidTypeError, "year"))


@pytest.mark.parametrize("call,error,words", LLAMA_INDEX_CASES)
def test_llama_index_bad_input(engine_and_dir, call, error, words):
    _check(engine_and_dir, call, error, words)


# ---------------------------------------------------------------- LangChain surface
def _lc_chat(**kw):
    def call(e, d):
        from msa_plugins.integrations.langchain import ChatMSA

        return ChatMSA(engine=e, **kw).invoke(QUESTION)
    return call


def _lc_store(method, *args, **kw):
    def call(e, d):
        from msa_plugins.integrations.langchain import MSAVectorStore

        return getattr(MSAVectorStore(e), method)(*args, **kw)
    return call


LANGCHAIN_CASES = [
    _case("lc-chat-max-tokens-string", lambda e, d: __import__("msa_plugins.integrations.langchain",
                                                              fromlist=["ChatMSA"]).ChatMSA(engine=e).invoke(
        QUESTION, max_tokens="5"), InvalidTypeError, "max_new_tokens"),
    _case("lc-chat-k-zero", _lc_chat(k=0), InvalidArgumentError, "k must be >= 1"),
    _case("lc-chat-temperature-negative", _lc_chat(temperature=-1.0), InvalidArgumentError, "temperature"),
    _case("lc-chat-mode-unknown", _lc_chat(mode="fast"), InvalidArgumentError, "mode"),
    _case("lc-chat-empty-question", lambda e, d: __import__("msa_plugins.integrations.langchain", fromlist=["ChatMSA"])
          .ChatMSA(engine=e).invoke(""), InvalidArgumentError, "empty"),
    _case("lc-store-k-zero", _lc_store("similarity_search", QUESTION, k=0), InvalidArgumentError, "k"),
    _case("lc-store-filter-operator", _lc_store("similarity_search", QUESTION, filter={"topic": {"$near": 1}}),
          InvalidArgumentError, "$near"),
    _case("lc-store-filter-type", _lc_store("similarity_search", QUESTION, filter=5), InvalidTypeError, "filter"),
    _case("lc-store-unknown-kwarg", _lc_store("similarity_search", QUESTION, score_threshold=0.5),
          InvalidArgumentError, "score_threshold"),
    _case("lc-store-bad-metadata", _lc_store("add_texts", ["new text"], metadatas=[{"a": (1,)}]), InvalidTypeError,
          "metadata"),
    _case("lc-store-empty-text", _lc_store("add_texts", [""]), InvalidArgumentError, "empty"),
    _case("lc-store-embeddings-swap", lambda e, d: __import__("msa_plugins.integrations.langchain",
                                                             fromlist=["MSAVectorStore"]).MSAVectorStore(None),
          InvalidTypeError, "needs the MSAEngine"),
]


@pytest.mark.parametrize("call,error,words", LANGCHAIN_CASES)
def test_langchain_bad_input(engine_and_dir, call, error, words):
    _check(engine_and_dir, call, error, words)


# ---------------------------------------------------------------- command line
CLI_CASES = [
    ("cli-ask-missing-memory", lambda d, m: ["ask", "Where?", "--memory", str(d.parent / "nowhere")], "does not exist"),
    ("cli-ask-not-a-memory", lambda d, m: ["ask", "Where?", "--memory", str(d.parent)], "no memory"),
    ("cli-ask-k-zero", lambda d, m: ["ask", "Where?", "--memory", str(d), "-k", "0"], "k must be >= 1"),
    ("cli-ask-empty-question", lambda d, m: ["ask", " ", "--memory", str(d)], "empty"),
    ("cli-ask-max-new-negative", lambda d, m: ["ask", "Where?", "--memory", str(d), "--max-new-tokens", "-1"],
     "max_new_tokens"),
    ("cli-ingest-missing-path", lambda d, m: ["ingest", str(d.parent / "no-such.txt"), "--memory", str(d)],
     "no-such.txt"),
    ("cli-ingest-into-user-folder", lambda d, m: ["ingest", str(m), "--memory", str(_user_folder(d) or
                                                                                   d.parent / "user-notes")],
     "no memory"),
    ("cli-info-not-a-memory", lambda d, m: ["info", str(d.parent)], "no memory"),
    ("cli-info-missing", lambda d, m: ["info", str(d.parent / "nowhere")], "does not exist"),
]


@pytest.mark.parametrize("name,argv,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(engine_and_dir, capsys, name, argv, words):
    """One line on stderr, exit code 2, no traceback, and the memory folder unchanged."""
    from msa_plugins.cli import main

    _, memory_dir, model_dir = engine_and_dir
    text_file = memory_dir.parent / "note.txt"
    text_file.write_text("Carla paints in Porto.")
    disk = _disk(memory_dir)
    code = main(["--model", model_dir, "--device", "cpu"] + argv(memory_dir, text_file))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("msa: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert words.lower() in lines[0].lower(), lines[0]
    assert _disk(memory_dir) == disk
