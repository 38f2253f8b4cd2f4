"""Tool-calling agents: FunctionAgent(tools=[...], llm=...) and ReActAgent. Swap: llm=MSALLM(engine).

MSALLM is a FunctionCallingLLM (the JSON tool protocol in the prompt); a random model does not call tools,
so the agent finishes with its text answer. What is checked: the agents accept the LLM, the model is shown
the tools and their schemas, and the run completes."""

import asyncio

from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent
from llama_index.core.tools import FunctionTool

from msa_plugins.integrations.llama_index import MSALLM


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_function_agent_and_react_agent(engine, events):
    llm = MSALLM(engine, max_retries=0)
    assert llm.metadata.is_function_calling_model
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(add)], llm=llm, system_prompt="You add numbers.")
    response = asyncio.run(_run(agent, "What is 2 + 3?"))
    assert isinstance(str(response), str)
    shown = [m.content for e in events if isinstance(e, LLMChatStartEvent) for m in e.messages]
    assert any('"name": "<tool name>"' in p and "add" in p and '"a"' in p for p in shown)

    react = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=llm)
    assert isinstance(str(asyncio.run(_run(react, "What is 2 + 3?"))), str)


async def _run(agent, question):
    return await agent.run(user_msg=question)
