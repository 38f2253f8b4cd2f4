"""Observability: LlamaIndex instrumentation events and Settings.callback_manager with LlamaDebugHandler and
TokenCountingHandler around a query. Swap: vector store, embed model, Settings.llm = MSALLM(engine)."""

from llama_index.core import Settings, StorageContext, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler

from msa_plugins.integrations.llama_index import MSALLM, MSAVectorStore, NoEmbedding


def test_events_and_token_counts(engine, docs, events):
    debug, tokens = LlamaDebugHandler(), TokenCountingHandler()
    Settings.callback_manager = CallbackManager([debug, tokens])
    Settings.llm = MSALLM(engine)
    Settings.embed_model = NoEmbedding()
    index = VectorStoreIndex.from_documents(
        docs, storage_context=StorageContext.from_defaults(vector_store=MSAVectorStore(engine)))
    events.clear()
    response = index.as_query_engine().query("Where was Alice born?")

    kinds = {type(e).__name__ for e in events}
    assert {"RetrievalStartEvent", "RetrievalEndEvent", "SynthesizeStartEvent", "SynthesizeEndEvent",
            "LLMChatStartEvent", "LLMChatEndEvent", "QueryStartEvent", "QueryEndEvent"} <= kinds
    retrieved = next(e for e in events if type(e).__name__ == "RetrievalEndEvent")
    assert [n.node_id for n in retrieved.nodes] == [n.node_id for n in response.source_nodes]

    assert debug.get_event_pairs(CBEventType.RETRIEVE) and debug.get_event_pairs(CBEventType.LLM)
    # token counts come from the model's own tokenizer (MSALLM's raw usage), not tiktoken
    end = next(e for e in events if type(e).__name__ == "LLMChatEndEvent")
    usage = end.response.raw["usage"]
    assert tokens.prompt_llm_token_count == usage["prompt_tokens"] > 0
    assert tokens.completion_llm_token_count == usage["completion_tokens"] > 0
