"""LlamaIndex starter + FAQ knobs: VectorStoreIndex.from_documents -> as_query_engine(similarity_top_k,
response_mode, node_postprocessors, text_qa_template, streaming). Swap: vector store, embed model, llm."""

from llama_index.core import PromptTemplate, StorageContext, VectorStoreIndex
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent
from llama_index.core.postprocessor import SimilarityPostprocessor

from msa_plugins.integrations.llama_index import MSALLM, MSAVectorStore, NoEmbedding


def test_starter_query_engine(engine, docs, events):
    vector_store = MSAVectorStore(engine)
    storage_context = StorageContext.from_defaults(vector_store=vector_store)
    index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, embed_model=NoEmbedding())
    llm = MSALLM(engine)

    question = "What is the capital of France?"
    base = index.as_query_engine(llm=llm, similarity_top_k=3).query(question)
    assert len(base.source_nodes) == 3
    assert {n.node.ref_doc_id for n in base.source_nodes} <= {d.id_ for d in docs}
    scores = [n.score for n in base.source_nodes]
    assert scores == sorted(scores, reverse=True)

    # node_postprocessors are honoured: a cutoff between the 1st and 2nd score keeps one source
    cutoff = (scores[0] + scores[1]) / 2
    qe = index.as_query_engine(llm=llm, similarity_top_k=3, response_mode="tree_summarize",
                               node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=cutoff)])
    kept = qe.query(question)
    assert [n.node_id for n in kept.source_nodes] == [base.source_nodes[0].node_id]

    # text_qa_template is what the LLM is shown
    events.clear()
    template = PromptTemplate("CONTEXT-MARKER\n{context_str}\nQ: {query_str}\nA: ")
    index.as_query_engine(llm=llm, text_qa_template=template).query(question)
    prompts = [m.content for e in events if isinstance(e, LLMChatStartEvent) for m in e.messages]
    assert any("CONTEXT-MARKER" in p and question in p for p in prompts)

    # streaming, and LlamaIndex's default top-k (2)
    streamed = index.as_query_engine(llm=llm, streaming=True).query(question)
    assert len(streamed.source_nodes) == 2
    assert isinstance("".join(streamed.response_gen), str)
