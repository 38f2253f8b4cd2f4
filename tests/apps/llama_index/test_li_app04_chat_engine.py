"""Chat engine: as_chat_engine(chat_mode="condense_plus_context", memory=ChatMemoryBuffer, context_prompt,
similarity_top_k), a follow-up turn, stream_chat, achat. Swap: vector store, embed model, llm."""

import asyncio

from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.memory import ChatMemoryBuffer

from msa_plugins.integrations.llama_index import MSALLM, MSAVectorStore, NoEmbedding


def test_condense_plus_context_chat(engine, docs):
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=MSAVectorStore(engine)),
        embed_model=NoEmbedding())
    chat_engine = index.as_chat_engine(
        chat_mode="condense_plus_context", llm=MSALLM(engine), similarity_top_k=2,
        memory=ChatMemoryBuffer.from_defaults(token_limit=300),
        context_prompt="You answer questions about the documents.\n{context_str}\nAnswer briefly.")
    first = chat_engine.chat("Where was Alice born?")
    assert len(first.source_nodes) == 2
    assert {n.node.ref_doc_id for n in first.source_nodes} <= {d.id_ for d in docs}
    follow = chat_engine.chat("And what does she do?")
    assert len(follow.source_nodes) == 2
    assert len(chat_engine.chat_history) == 4  # two user turns, two answers

    streamed = chat_engine.stream_chat("Tell me about Paris.")
    assert isinstance("".join(streamed.response_gen), str) and streamed.source_nodes
    answer = asyncio.run(chat_engine.achat("Which city has museums?"))
    assert answer.source_nodes
