"""An agent that remembers facts across conversations in MSA memory (LangGraph `MSAStore`).

Conversation 1 stores facts about the user in the store (namespace = the user); conversation 2, a fresh
thread, recalls them: a `before_model` middleware routes the new question over that user's memories and
hands the best one to the model. `create_agent(..., store=MSAStore(engine))` is the only MSA-specific line.
Runs offline on the embedded SmolLM2-135M (no tool calling: memories are written by the app, not by tools).
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import before_model  # noqa: E402
from langchain_core.messages import SystemMessage  # noqa: E402
from langgraph.runtime import Runtime  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402
from msa_plugins.integrations.langchain import ChatMSA, MSAStore  # noqa: E402

USER = ("memories", "ana")


@before_model
def recall(state, runtime: Runtime):
    question = state["messages"][-1].content
    hits = runtime.store.search(USER, query=question, limit=1)
    print("[recall]", [(h.key, round(h.score, 3)) for h in hits])
    if hits:
        return {"messages": [SystemMessage(f"Known about the user: {hits[0].value['text']}")]}
    return None


def main():
    engine = MSAEngine.from_pretrained(device="cpu", max_new_tokens=12)
    store = MSAStore(engine)  # MSA: items live in the "langgraph_store" collection, apart from documents

    # conversation 1: the app saves what the user tells it
    for key, fact in [("pet", "Ana's cat is called Biscuit."), ("city", "Ana lives in Porto.")]:
        store.put(USER, key, {"text": fact})
    store.put(("memories", "ben"), "pet", {"text": "Ben has a parrot called Kiwi."})
    print("[store] namespaces:", store.list_namespaces())

    # conversation 2 (new thread): the agent recalls from Ana's scope only (the middleware injects the memory;
    # ChatMSA itself only routes over its own collection, so store items never reach it unasked)
    agent = create_agent(ChatMSA(engine=engine, max_tokens=12, use_memory=False), tools=[], store=store,
                         middleware=[recall])
    out = agent.invoke({"messages": [{"role": "user", "content": "What is my cat called?"}]})
    print("[agent] answer:", out["messages"][-1].content.strip())

    # memories persist with the engine's memory bank
    with tempfile.TemporaryDirectory() as d:
        engine.save(d)
        again = MSAStore(MSAEngine.from_pretrained(device="cpu", memory=d))
        print("[store] after reload:", again.get(USER, "pet").value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
