"""Observability: callbacks, astream_events, token counting with the model's tokenizer, serialization."""

import asyncio
import json

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from msa_plugins.integrations.langchain import ChatMSA, MSAVectorStore


class Recorder(BaseCallbackHandler):
    def __init__(self):
        self.events, self.usage = [], None

    def on_retriever_start(self, *a, **kw):
        self.events.append("retriever_start")

    def on_retriever_end(self, *a, **kw):
        self.events.append("retriever_end")

    def on_chat_model_start(self, *a, **kw):
        self.events.append("chat_model_start")

    def on_llm_new_token(self, token, **kw):
        self.events.append("token")

    def on_llm_end(self, response, **kw):
        self.events.append("llm_end")
        self.usage = response.generations[0][0].message.usage_metadata


def test_callbacks_events_tokens_and_serialization(engine, documents):
    store = MSAVectorStore.from_documents(documents, engine=engine)  # MSA
    llm = ChatMSA(engine=engine, max_tokens=4)  # MSA
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    chain = prompt | llm | StrOutputParser()
    rec = Recorder()
    store.as_retriever().invoke("Who repairs bicycles?", config={"callbacks": [rec]})
    "".join(chain.stream({"question": "Who repairs bicycles?"}, config={"callbacks": [rec]}))
    assert rec.events[:3] == ["retriever_start", "retriever_end", "chat_model_start"]
    assert rec.events.count("token") >= 1 and rec.events[-1] == "llm_end"
    assert rec.usage["input_tokens"] > 0 and rec.usage["output_tokens"] > 0

    async def kinds():
        return {e["event"] async for e in chain.astream_events({"question": "Who repairs bicycles?"}, version="v2")}
    assert {"on_chat_model_start", "on_chat_model_stream", "on_chat_model_end", "on_chain_end"} <= asyncio.run(kinds())

    text = "The robot Tilly repairs bicycles."
    assert llm.get_num_tokens(text) == engine.count_tokens(text) > 0  # the model's own tokenizer, not GPT-2's
    assert llm.get_num_tokens_from_messages([HumanMessage(text)]) > llm.get_num_tokens(text)
    ser = dumpd(llm)
    assert ser["type"] == "constructor" and "engine" not in ser["kwargs"] and json.loads(json.dumps(ser))
    assert ChatMSA(engine=engine, **ser["kwargs"]).max_tokens == 4
