"""The `msa` CLI and one end-to-end run on the embedded default model (SmolLM2-135M-Instruct)."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSA = [sys.executable, "-m", "msa_plugins.cli"]


def run(args, **kw):
    return subprocess.run(MSA + args, capture_output=True, text=True, cwd=ROOT, timeout=600, **kw)


def test_cli_ingest_ask_info_with_a_tiny_model(tiny_model_dir, tmp_path):
    mem = str(tmp_path / "mem")
    model = ["--model", tiny_model_dir("llama"), "--device", "cpu"]
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "data", "*.txt")))[:3]
    r = run(model + ["ingest", *files, "--memory", mem])
    assert r.returncode == 0, r.stderr
    assert "ingested 3 documents" in r.stdout
    r = run(model + ["ingest", *files, "--memory", mem])  # idempotent: already present
    assert "skipped 3 already present" in r.stdout
    r = run(model + ["ask", "Who built the lighthouse?", "--memory", mem, "--json", "--max-new-tokens", "3", "-k", "2"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["documents"]) == 2 and set(out["timings"]) >= {"routing_s", "first_token_s", "total_s"}
    r = run(["info", mem])
    info = json.loads(r.stdout)
    assert info["n_documents"] == 3 and info["fingerprint"]["chunk_size"] == 64


def test_cli_rejects_non_utf8_files_and_adds_nothing(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 au lait")
    r = run(["--model", tiny_model_dir("llama"), "ingest", str(bad), "--memory", str(tmp_path / "m")])
    assert r.returncode != 0 and "not UTF-8" in (r.stderr + r.stdout)
    assert not os.path.exists(tmp_path / "m" / "manifest.json")


@pytest.mark.slow
def test_default_model_end_to_end(default_engine, tmp_path):
    """Ingest the sample corpus on the real embedded model, ask, get routed documents back (mechanics only:
    a 135M model routing with its own attention is at chance, NOTES.md)."""
    e = default_engine
    files = sorted(glob.glob(os.path.join(ROOT, "examples", "data", "*.txt")))
    ids = e.add([open(f).read() for f in files], ids=[os.path.basename(f) for f in files])
    try:
        res = e.query("Who built the Varnholm Lighthouse?", k=3, max_new_tokens=12)
        assert len(res.documents) == 3 and all(d.id in ids for d in res.documents)
        assert res.answer and res.completion_tokens > 0
        sparse = e.query("Who built the Varnholm Lighthouse?", mode="sparse", k=3, max_new_tokens=4)
        assert len(sparse.per_layer) == len(e.routing_layers)
        e.save(str(tmp_path))
        assert json.load(open(tmp_path / "manifest.json"))["fingerprint"]["model"] == "SmolLM2-135M-Instruct"
    finally:
        e.delete(ids)
