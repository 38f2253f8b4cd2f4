"""A LangChain retriever chain, then the same chain on MSA memory. Runs offline on the embedded SmolLM2-135M.

The lines that change (marked `# MSA:` below):

    - store = InMemoryVectorStore.from_texts(texts, embedding, metadatas=metas, ids=ids)
    + store = MSAVectorStore.from_texts(texts, metadatas=metas, ids=ids, engine=engine)
    # the chain itself (retriever | format | prompt | llm) is unchanged; or drop it entirely:
    + llm = ChatMSA(engine=engine)   # routing + answering in one call, routed docs in response_metadata

`add_documents(ids=...)`, `delete`, `get_by_ids`, `similarity_search(_with_score)`, `filter=`, `as_retriever`,
streaming, async and callbacks keep working.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnablePassthrough  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402
from msa_plugins.integrations.langchain import ChatMSA, MSAVectorStore  # noqa: E402

NAMES = ["lighthouse", "robot", "festival"]
QUESTION = "How long does the battery of Pebble-7 last?"


def main():
    engine = MSAEngine.from_pretrained(device="cpu", max_new_tokens=12)
    texts = [open(os.path.join(HERE, "data", f"{n}.txt")).read() for n in NAMES]
    metas = [{"topic": n} for n in NAMES]

    store = MSAVectorStore.from_texts(texts, metadatas=metas, ids=NAMES, engine=engine)  # MSA: was InMemoryVectorStore
    retriever = store.as_retriever(search_kwargs={"k": 2})
    # any chat model works here. ChatMSA's default use_memory="auto" sees that the prompt already quotes the
    # retrieved documents and does not route a second time (use_memory=False: never route)
    llm = ChatMSA(engine=engine, max_tokens=12)

    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from the context.\n\n{context}"), ("human", "{question}")])
    chain = ({"context": retriever | (lambda docs: "\n\n".join(d.page_content for d in docs)),
              "question": RunnablePassthrough()} | prompt | llm | StrOutputParser())
    print("[chain] routed:", [d.id for d in retriever.invoke(QUESTION)])
    print("[chain] answer:", chain.invoke(QUESTION).strip())
    print("[store] filtered:", [d.id for d in store.similarity_search(QUESTION, k=3, filter={"topic": "robot"})])
    print("[store] mmr:", [d.id for d in store.max_marginal_relevance_search(QUESTION, k=2, fetch_k=3)])

    # or let the model route and answer in one call (no retriever, no prompt stitching)
    chat = ChatMSA(engine=engine, max_tokens=12, k=2)  # MSA
    pieces = []
    for chunk in chat.stream(QUESTION):
        pieces.append(chunk.content)
        if chunk.chunk_position == "last":
            print("[ChatMSA] routed:", [d["id"] for d in chunk.response_metadata["documents"]])
            print("[ChatMSA] usage:", chunk.usage_metadata, "total_s:",
                  round(chunk.response_metadata["timings"]["total_s"], 2))
    print("[ChatMSA] answer:", "".join(pieces).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
