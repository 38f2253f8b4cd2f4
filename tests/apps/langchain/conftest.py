"""LangChain / LangGraph apps in the frameworks' canonical style, ported with only the documented swap.

Each app keeps the canonical code and marks the swapped lines `# MSA`. Mechanics run on a tiny random model
(answers are noise, behaviour is not); the `slow` apps use the embedded SmolLM2 (`default_engine`).
"""

import pytest

pytest.importorskip("langchain_core")

from msa_plugins import MSAEngine  # noqa: E402

CORPUS = [
    ("robot", "The robot Tilly repairs bicycles in the harbour workshop every Tuesday.", {"source": "robot.txt", "year": 2021}),
    ("bakery", "The bakery on Elm Street sells rye bread baked with caraway seeds.", {"source": "bakery.txt", "year": 2019}),
    ("garden", "The community garden grows tomatoes, beans and sunflowers along the river.", {"source": "garden.txt", "year": 2023}),
    ("chess", "The chess club meets on Fridays in the old library and plays blitz games.", {"source": "chess.txt", "year": 2020}),
]

@pytest.fixture()
def engine(tiny_model_dir):
    """A fresh engine on the tiny random model (empty memory)."""
    return MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", k=2, max_new_tokens=4)


@pytest.fixture()
def documents():
    from langchain_core.documents import Document
    return [Document(page_content=t, metadata=m, id=i) for i, t, m in CORPUS]
