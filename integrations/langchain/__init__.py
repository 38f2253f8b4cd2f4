"""LangChain / LangGraph surfaces for an `MSAEngine`.

    # before                                              # after
    store = InMemoryVectorStore.from_texts(texts, emb)    store = MSAVectorStore.from_texts(texts, engine=engine)
    retriever = store.as_retriever(search_kwargs={"k": 3}) retriever = store.as_retriever(search_kwargs={"k": 3})
    llm = ChatOpenAI(...)                                 llm = ChatMSA(engine=engine)   # answers from memory
    agent = create_agent(llm, tools, store=InMemoryStore()) agent = create_agent(llm, tools, store=MSAStore(engine))

- `ChatMSA` (`chat_models`): a chat model answering from the engine's memory.
- `MSARetriever` (`retrievers`) / `MSAVectorStore` (`vectorstores`): the model's router ranks (no embeddings).
- `MSAStore` (`stores`): a LangGraph `BaseStore` whose items live in the engine's memory. Imported on first
  use, so everything else works without langgraph installed.
- `filter_to_predicate` / `filter_to_allow_ids` (`filters`): the dict filter language, as the engine's `where`.

Everything here uses the public `msa_plugins` API only (`MSAEngine`, `Snapshot`, `Stream`, `AnswerOptions`).
"""

from __future__ import annotations

from msa_plugins import __version__

from .chat_models import ChatMSA
from .filters import filter_to_allow_ids, filter_to_predicate
from .retrievers import MSARetriever
from .vectorstores import MSAVectorStore

__all__ = ["ChatMSA", "MSARetriever", "MSAVectorStore", "MSAStore", "filter_to_allow_ids", "filter_to_predicate",
           "__version__"]


def __getattr__(name: str):
    # MSAStore is the only name needing langgraph; import it (and report a missing langgraph) on first use
    if name == "MSAStore":
        try:
            from .stores import MSAStore
        except ModuleNotFoundError as e:
            if e.name is None or not e.name.startswith("langgraph"):
                raise
            raise ModuleNotFoundError(f"MSAStore needs langgraph ({e}); install it with "
                                      "pip install 'msa-plugins[langchain]'", name=e.name) from e
        globals()["MSAStore"] = MSAStore  # later lookups skip this function
        return MSAStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
