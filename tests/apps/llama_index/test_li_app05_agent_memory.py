"""LlamaIndex agent memory: Memory.from_defaults(memory_blocks=[...]) with long-term memory.
Swap: VectorMemoryBlock(vector_store=..., embed_model=...) -> MSAMemoryBlock(engine=engine, scope=...)."""

import asyncio

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.memory import Memory

from msa_plugins.integrations.llama_index import MSAMemoryBlock


def test_long_term_memory_block(engine):
    engine.add(["The shop opens at nine."])  # the app's documents, in the default collection
    block = MSAMemoryBlock(name="long_term", engine=engine, scope="ana", k=2)
    memory = Memory.from_defaults(session_id="ana", token_limit=40, chat_history_token_ratio=0.5,
                                  token_flush_size=10, memory_blocks=[block])

    async def run():
        for role, text in [("user", "My cat is called Biscuit."), ("assistant", "Nice name!"),
                           ("user", "I live in Lisbon near the river."), ("assistant", "Lisbon is lovely.")]:
            await memory.aput(ChatMessage(role=role, content=text))
        await memory.aput(ChatMessage(role="user", content="What is my cat called?"))
        return await memory.aget()

    messages = asyncio.run(run())
    system = messages[0]
    assert system.role == MessageRole.SYSTEM and "long_term" in system.content
    assert "Biscuit" in system.content or "Lisbon" in system.content  # a flushed turn came back
    assert "opens at nine" not in system.content  # documents of other collections never reach the block
    # the memories live in their own collection: the app's document search never sees them
    assert all("Biscuit" not in d.text for d in engine.retrieve("What is my cat called?", k=5))
