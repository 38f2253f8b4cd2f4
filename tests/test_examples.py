"""The migration and agent-memory examples run offline, end to end, on the embedded default model."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def _line(out: str, prefix: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith(prefix)]
    assert lines, f"no {prefix!r} line in:\n{out}"
    return lines[0][len(prefix):].strip()


@pytest.mark.slow
def test_llama_index_migration_example():
    out = run_example("llama_index_migration.py")
    assert _line(out, "[MSA] answer:")
    sources = _line(out, "[MSA] sources:")
    assert sum(n in sources for n in ("lighthouse", "robot", "festival")) == 2
    assert "'completion_tokens'" in _line(out, "[MSA] timings:")
    assert _line(out, "[MSA] filtered sources:") == "['robot']"
    assert _line(out, "[MSA] reloaded documents:") == "['festival', 'lighthouse', 'robot']"


@pytest.mark.slow
def test_langchain_migration_example():
    out = run_example("langchain_migration.py")
    assert _line(out, "[chain] answer:") and _line(out, "[ChatMSA] answer:")
    assert _line(out, "[store] filtered:") == "['robot']"
    assert "'output_tokens'" in _line(out, "[ChatMSA] usage:")
    assert _line(out, "[chain] routed:") == _line(out, "[ChatMSA] routed:")  # same router, same ranking


@pytest.mark.slow
def test_agent_memory_example():
    out = run_example("agent_memory.py")
    assert _line(out, "[store] namespaces:") == "[('memories', 'ana'), ('memories', 'ben')]"
    assert _line(out, "[recall]").startswith("[('pet'") or _line(out, "[recall]").startswith("[('city'")
    assert _line(out, "[agent] answer:")
    assert _line(out, "[store] after reload:") == "{'text': \"Ana's cat is called Biscuit.\"}"
