"""`msa eval` run twice: encoded MSA memories come from the on-disk bank cache the second time.

Tiny random model, retrieval-only runs of the `msa` system (no generation, no RAG index): what is checked
is whether a memory was encoded (the engine's public `add` / `upsert`, counted) or loaded, and that a
loaded memory routes exactly like the encoded one. The cache always lives under tmp_path.
"""
import glob
import json
import logging
import os

import pytest

from msa_plugins.integrations.ragas.datasets import EvalDoc, EvalQuestion, EvalSet

DOCS = [("paris", "Paris is the capital of France. The Eiffel Tower stands there."),
        ("berlin", "Berlin is the capital of Germany, on the river Spree."),
        ("tokyo", "Tokyo is the capital of Japan and its largest city."),
        ("nile", "The Nile is a river in Africa, flowing north into the Mediterranean."),
        ("alice", "Alice was born in 1990 in Lisbon and works as a painter.")]
QUESTIONS = [("q1", "What is the capital of France?", ["Paris"], ["paris"]),
             ("q2", "Where was Alice born?", ["Lisbon"], ["alice"])]


def evalset(name="tiny", changed=None):
    """The tiny corpus; `changed`: {doc_id: new text}."""
    changed = changed or {}
    docs = [EvalDoc(i, changed.get(i, t), title=i.title()) for i, t in DOCS]
    return EvalSet(name, docs, [EvalQuestion(*q) for q in QUESTIONS])


class Counting:
    """engine_factory for run_eval: real engines whose encoding calls (`add`, `upsert`) are counted."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.encodes = 0

    def __call__(self, router):
        from msa_plugins import MSAEngine

        engine = MSAEngine.from_pretrained(self.model_dir, router=router, device="cpu", chunk_size=8)
        for name in ("add", "upsert"):
            original = getattr(engine, name)

            def counted(*args, _original=original, **kwargs):
                self.encodes += 1
                return _original(*args, **kwargs)

            setattr(engine, name, counted)
        return engine


def run(model_dir, cache_dir, memories, router=None, out=None):
    from msa_plugins.integrations.ragas.ab import run_eval

    factory = Counting(model_dir)
    res = run_eval("jsonl", memories=memories, systems=["msa"], retrieval_only=True, k=2, router=router,
                   engine_factory=factory, bank_cache=str(cache_dir), out_dir=out, progress=False)
    return res, factory.encodes


def routed(res):
    return [(r["dataset"], r["question_id"], [(d["doc_id"], round(d["score"], 5)) for d in r["retrieved"]])
            for r in res.records]


def entries(cache_dir):
    return sorted(p for p in glob.glob(os.path.join(cache_dir, "*")) if os.path.isdir(p))


def test_second_identical_run_loads_every_memory_and_encodes_nothing(tiny_model_dir, tmp_path, caplog):
    model, cache = tiny_model_dir("llama"), tmp_path / "banks"
    # two memories (like NIAH samples): the second differs from the first in one document
    memories = [evalset("a"), evalset("b", changed={"nile": "The Nile flows through Egypt and Sudan."})]
    first, encodes = run(model, cache, memories)
    assert encodes == 2 and first.summary["bank_cache"] == {"hits": 0, "misses": 2, "dir": str(cache)}
    assert len(entries(cache)) == 2
    caplog.set_level(logging.INFO, logger="msa_plugins")
    second, encodes = run(model, cache, memories, out=str(tmp_path / "run2"))
    assert encodes == 0  # nothing encoded: both memories were loaded
    assert second.summary["bank_cache"] == {"hits": 2, "misses": 0, "dir": str(cache)}
    assert routed(second) == routed(first)  # the loaded banks route exactly like the encoded ones
    extra = second.summary["systems"]["msa"]["extra"]
    assert extra["ingest_tokens"] == 0 and extra["bank_cache_hits"] == 2 and extra["bank_load_s"] > 0
    assert "bank cache hit" in caplog.text
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert summary["bank_cache"]["hits"] == 2
    machine = summary["machine"]
    assert set(machine) == {"cpu_count", "load_avg_start", "load_avg_end", "torch_threads", "device", "platform"}
    assert machine["device"] == summary["settings"]["device"] == "cpu" and machine["torch_threads"] >= 1
    report = (tmp_path / "run2" / "report.md").read_text()
    assert "Machine (timings above" in report and "MSA bank cache: 2 hits" in report


def test_a_changed_corpus_or_router_misses(tiny_model_dir, tmp_path):
    import torch

    from msa_plugins import MSAEngine
    from msa_plugins.engine.router import Router

    model, cache = tiny_model_dir("llama"), tmp_path / "banks"
    first, _ = run(model, cache, [evalset()])
    assert first.summary["bank_cache"]["misses"] == 1
    # one document's text changed: another corpus hash
    res, encodes = run(model, cache, [evalset(changed={"tokyo": "Tokyo is the capital of Japan."})])
    assert encodes == 1 and res.summary["bank_cache"]["hits"] == 0 and res.summary["bank_cache"]["misses"] == 1
    # only a document's metadata changed: still another corpus
    es = evalset()
    es.documents[0].metadata["source"] = "elsewhere"
    res, encodes = run(model, cache, [es])
    assert encodes == 1 and res.summary["bank_cache"]["hits"] == 0
    # the same corpus under another (trained) router
    m = MSAEngine.from_pretrained(model, device="cpu").model
    layers = list(range(m.n_layers // 2, m.n_layers))
    gen = torch.Generator().manual_seed(0)
    wq = {l: torch.randn(m.n_heads * m.head_dim, m.hidden_size, generator=gen) for l in layers}
    wk = {l: torch.randn(m.n_kv_heads * m.head_dim, m.hidden_size, generator=gen) for l in layers}
    Router(wq, wk, m.n_heads, m.n_kv_heads, m.head_dim).save(str(tmp_path / "router"))
    res, encodes = run(model, cache, [evalset()], router=str(tmp_path / "router"))
    assert encodes == 1 and res.summary["bank_cache"] == {"hits": 0, "misses": 1, "dir": str(cache)}
    assert res.summary["routers"]["msa"] != first.summary["routers"]["msa"]
    # and the original inputs still hit
    res, encodes = run(model, cache, [evalset()])
    assert encodes == 0 and res.summary["bank_cache"]["hits"] == 1


def _flip_a_tensor_byte(entry):
    path = glob.glob(os.path.join(entry, "memory", "tensors-*.safetensors"))[0]
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _drop_entry_json(entry):
    os.remove(os.path.join(entry, "entry.json"))


def _swap_in_another_corpus(entry, model, tmp_path):
    """A valid memory of the right model, but of other documents, where this entry's memory was."""
    from msa_plugins import MSAEngine

    other = MSAEngine.from_pretrained(model, device="cpu", chunk_size=8)
    other.add(["Some other text.", "And another one."], ids=["x", "y"], progress=False)
    import shutil

    shutil.rmtree(os.path.join(entry, "memory"))
    other.save(os.path.join(entry, "memory"))


@pytest.mark.parametrize("damage", ["flipped_byte", "no_entry_json", "another_corpus"])
def test_a_damaged_entry_is_ignored_with_a_warning_and_rebuilt(tiny_model_dir, tmp_path, caplog, damage):
    model, cache = tiny_model_dir("llama"), tmp_path / "banks"
    first, _ = run(model, cache, [evalset()])
    (entry,) = entries(cache)
    if damage == "flipped_byte":
        _flip_a_tensor_byte(entry)
    elif damage == "no_entry_json":
        _drop_entry_json(entry)
    else:
        _swap_in_another_corpus(entry, model, tmp_path)
    caplog.set_level(logging.WARNING, logger="msa_plugins")
    res, encodes = run(model, cache, [evalset()])  # no crash, and never the wrong bank
    assert "damaged entry" in caplog.text
    assert encodes == 1 and res.summary["bank_cache"] == {"hits": 0, "misses": 1, "dir": str(cache)}
    assert routed(res) == routed(first)
    assert entries(cache) == [entry]  # rebuilt in place, no temp folders left behind
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp-") or ".trash-" in p]
    res, encodes = run(model, cache, [evalset()])
    assert encodes == 0 and res.summary["bank_cache"]["hits"] == 1  # the rebuilt entry is good


def test_msa_eval_cli_second_run_hits_with_options_after_the_subcommand(tiny_model_dir, tmp_path, monkeypatch):
    """The CLI end to end, twice (retrieval only): --model/--device after `eval`, the cache in --bank-cache."""
    from msa_plugins.cli import main

    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "never-used"))
    docs, qa = tmp_path / "docs.jsonl", tmp_path / "qa.jsonl"
    docs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in DOCS))
    qa.write_text("".join(json.dumps({"id": q[0], "question": q[1], "answers": q[2], "gold_ids": q[3]}) + "\n"
                          for q in QUESTIONS))
    args = ["eval", "--dataset", "jsonl", "--docs", str(docs), "--questions", str(qa), "--retrieval-only",
            "--systems", "msa", "-k", "2", "--quiet", "--bank-cache", str(tmp_path / "banks"),
            "--model", tiny_model_dir("llama"), "--device", "cpu"]
    summaries = []
    for n in range(2):
        assert main(args + ["--out", str(tmp_path / f"run{n}")]) == 0
        summaries.append(json.loads((tmp_path / f"run{n}" / "summary.json").read_text()))
    assert [s["bank_cache"]["hits"] for s in summaries] == [0, 1]
    assert [s["bank_cache"]["misses"] for s in summaries] == [1, 0]
    assert summaries[1]["bank_cache"]["dir"] == str(tmp_path / "banks")
    assert not os.path.exists(tmp_path / "never-used")
    # --no-bank-cache: nothing read or written
    before = ["--device", "cpu"] + args[:-6]  # the global options before `eval` work as they always did
    assert main(before + ["--no-bank-cache", "--model", tiny_model_dir("llama"), "--out", str(tmp_path / "r3")]) == 0
    off = json.loads((tmp_path / "r3" / "summary.json").read_text())
    assert off["bank_cache"] == {"hits": 0, "misses": 0, "dir": None}


def test_default_bank_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from msa_plugins.integrations.ragas.ab import default_bank_cache_dir

    monkeypatch.setenv("MSA_CACHE_DIR", str(tmp_path / "c"))
    assert default_bank_cache_dir() == str(tmp_path / "c" / "eval-banks")
    monkeypatch.delenv("MSA_CACHE_DIR")
    monkeypatch.delenv("MSA_PLUGINS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_bank_cache_dir() == str(tmp_path / "home" / ".cache" / "msa-plugins" / "eval-banks")


def test_niah_samples_are_not_stored_in_the_bank_cache(tiny_model_dir, tmp_path):
    """NIAH samples share their haystack within a run (encoded incrementally); a whole memory per sample
    would fill the disk, so NIAH never writes to the cache."""
    from msa_plugins.integrations.ragas.ab import run_eval

    cache = tmp_path / "banks"
    res = run_eval("niah", niah_sizes=[1024], niah_samples=2, systems=["msa"], retrieval_only=True, k=2,
                   engine_factory=Counting(tiny_model_dir("llama")), bank_cache=str(cache), progress=False,
                   out_dir=str(tmp_path / "run"))
    assert len(res.records) == 2
    assert entries(cache) == [] and res.summary["bank_cache"]["hits"] == res.summary["bank_cache"]["misses"] == 0
