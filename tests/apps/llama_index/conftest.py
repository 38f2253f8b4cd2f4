"""LlamaIndex apps in the framework's canonical style, each with only the documented swap:

    - embed_model=...                           + embed_model=NoEmbedding()
    - vector_store=ChromaVectorStore(...)       + vector_store=MSAVectorStore(engine)
    - llm=OpenAI(...)                           + llm=MSALLM(engine)

Tiny random models: the apps assert wiring and behaviour (sources, filters, isolation, events, token counts),
never answer quality."""

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402

DOCS = [
    Document(text="Paris is the capital of France. The Seine runs through it.", id_="france.txt",
             metadata={"country": "fr", "topic": "geo"}),
    Document(text="Alice was born in 1990 in Lisbon and works as a painter.", id_="alice.txt",
             metadata={"country": "pt", "topic": "people"}),
    Document(text="The quick brown fox jumps over the lazy dog.", id_="fox.txt",
             metadata={"country": "uk", "topic": "animals"}),
    Document(text="Berlin is the capital of Germany and has many museums.", id_="berlin.txt",
             metadata={"country": "de", "topic": "geo"}),
]


@pytest.fixture(scope="session")
def app_model_dir(tmp_path_factory):
    # LlamaIndex's chat engines and synthesizers reserve a few hundred tokens of window: a 4K-window tiny llama
    from tiny_models import make_tiny_model
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("app_llama4k")), max_position_embeddings=4096)


@pytest.fixture()
def engine(app_model_dir):
    return MSAEngine.from_pretrained(app_model_dir, device="cpu", max_new_tokens=4)


@pytest.fixture()
def docs():
    return [d.model_copy() for d in DOCS]


@pytest.fixture(autouse=True)
def restore_settings():
    """Apps set LlamaIndex's global Settings as the tutorials do; put them back afterwards."""
    saved = {name: getattr(Settings, f"_{name}") for name in ("llm", "embed_model", "callback_manager")}
    yield
    for name, value in saved.items():
        setattr(Settings, f"_{name}", value)


@pytest.fixture()
def events():
    """Every LlamaIndex instrumentation event emitted while the test runs (the root dispatcher)."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    seen = []

    class Recorder(BaseEventHandler):
        @classmethod
        def class_name(cls) -> str:
            return "Recorder"

        def handle(self, event, **kwargs):
            seen.append(event)

    dispatcher = get_dispatcher()
    handler = Recorder()
    dispatcher.add_event_handler(handler)
    yield seen
    dispatcher.event_handlers.remove(handler)
