import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")

from tiny_models import make_tiny_model  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """family -> folder of a tiny random model of that family (written once per test run)."""
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(family: str = "llama") -> str:
        if family not in cache:
            cache[family] = make_tiny_model(family, str(root / family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def default_engine():
    """The embedded default model (SmolLM2-135M-Instruct), converted once per machine, loaded once per run."""
    from msa_plugins import MSAEngine

    return MSAEngine.from_pretrained(device="cpu")
