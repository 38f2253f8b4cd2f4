"""LangChain long-term memory: create_agent(..., store=) with middleware reading runtime.store; isolation."""

import pytest

pytest.importorskip("langgraph")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import before_model  # noqa: E402
from langgraph.runtime import Runtime  # noqa: E402

from msa_plugins.integrations.langchain import ChatMSA, MSAStore, MSAVectorStore  # noqa: E402


def test_agent_with_store_recalls_from_its_namespace(engine):
    # store = InMemoryStore(index={"embed": embeddings, "dims": 1536})
    store = MSAStore(engine)  # MSA
    store.put(("memories", "ana"), "pet", {"text": "My cat is called Biscuit."})
    store.put(("memories", "ana"), "city", {"text": "I live in Lisbon near the river."})
    store.put(("memories", "bob"), "pet", {"text": "My dog is called Rex."})
    recalled = []

    @before_model
    def recall(state, runtime: Runtime):
        question = state["messages"][-1].content
        recalled.extend(runtime.store.search(("memories", "ana"), query=question, limit=2))
        return None

    agent = create_agent(ChatMSA(engine=engine, max_tokens=3), tools=[], store=store, middleware=[recall])  # MSA llm
    out = agent.invoke({"messages": [{"role": "user", "content": "What is my cat called?"}]})
    assert out["messages"][-1].usage_metadata["output_tokens"] >= 1
    assert {h.key for h in recalled} == {"pet", "city"} and all(h.namespace == ("memories", "ana") for h in recalled)


def test_put_index_false_and_index_fields(engine):
    store = MSAStore(engine)
    store.put(("m",), "routed", {"text": "The robot repairs bicycles."})
    store.put(("m",), "hidden", {"text": "The robot repairs bicycles too."}, index=False)
    store.put(("m",), "fields", {"title": "Bicycle repairs", "text": "ignored"}, index=["title"])
    hits = store.search(("m",), query="Who repairs bicycles?", limit=5)
    # as InMemoryStore: indexed items ranked (scored), unindexed ones fill the rest unscored
    assert {h.key for h in hits[:2]} == {"routed", "fields"} and all(h.score is not None for h in hits[:2])
    assert hits[2].key == "hidden" and hits[2].score is None
    assert [h.key for h in store.search(("m",), query="bicycles?", limit=2)] != ["hidden"]
    assert store.get(("m",), "hidden").value == {"text": "The robot repairs bicycles too."}


def test_store_items_never_leak_into_document_search_or_chat_routing(engine):
    docs = MSAVectorStore(engine)  # MSA
    docs.add_texts(["The bakery sells rye bread.", "The chess club meets on Fridays."], ids=["b", "c"])
    store = MSAStore(engine)  # MSA
    store.put(("ana", "memories"), "pin", {"text": "Ana's bank PIN is 4321."})
    found = docs.similarity_search("What is Ana's bank PIN?", k=10)
    assert {d.id for d in found} == {"b", "c"} and all("4321" not in d.page_content for d in found)
    msg = ChatMSA(engine=engine, max_tokens=2, k=5).invoke("What is Ana's bank PIN?")
    assert {d["id"] for d in msg.response_metadata["documents"]} == {"b", "c"}
    assert store.search(("ana",), query="PIN?")[0].value["text"] == "Ana's bank PIN is 4321."
