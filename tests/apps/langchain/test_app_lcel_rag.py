"""LangChain RAG tutorial part 1 (LCEL): vector store -> retriever -> format_docs -> prompt -> llm -> parser."""

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from msa_plugins.integrations.langchain import ChatMSA, MSAVectorStore

PROMPT = ChatPromptTemplate.from_messages([
    ("system", "Answer the question using only this context:\n\n{context}"),
    ("human", "{question}"),
])


def format_docs(docs):
    return "\n\n".join(d.page_content for d in docs)


class Ends(BaseCallbackHandler):
    def __init__(self):
        self.llm_ends, self.retrieved = [], []

    def on_llm_end(self, response, **kw):
        self.llm_ends.append(response.generations[0][0].message)

    def on_retriever_end(self, documents, **kw):
        self.retrieved.append([d.id for d in documents])


def test_lcel_rag_chain(engine, documents):
    # vector_store = InMemoryVectorStore(embeddings)
    vector_store = MSAVectorStore(engine)  # MSA
    vector_store.add_documents(documents=documents)
    retriever = vector_store.as_retriever(search_kwargs={"k": 2})
    # llm = ChatOpenAI(model="gpt-4o-mini")
    llm = ChatMSA(engine=engine, max_tokens=4)  # MSA
    chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()

    ends = Ends()
    answer = chain.invoke("Who repairs bicycles?", config={"callbacks": [ends]})
    assert isinstance(answer, str)
    (sources,) = ends.retrieved
    assert len(sources) == 2 and set(sources) <= {"robot", "bakery", "garden", "chess"}
    (msg,) = ends.llm_ends
    # the LLM of a retriever chain does not route a second time: its prompt already quotes the retrieved documents
    assert msg.response_metadata["memory"] == "skipped: the prompt already quotes 2 memory document(s)"
    assert msg.response_metadata["documents"] == []
    assert msg.usage_metadata["input_tokens"] > 0 and msg.usage_metadata["output_tokens"] > 0
    assert [m for m in chain.batch(["Who repairs bicycles?", "Where is rye bread sold?"])]
    assert "".join(chain.stream("Who repairs bicycles?")) == answer


def test_rag_prompt_in_one_human_message_and_explicit_memory_switch(engine, documents):
    # the hub's rlm/rag-prompt puts context and question in one human message
    prompt = ChatPromptTemplate.from_messages([("human", "Use the context to answer.\nQuestion: {question}\n"
                                                          "Context: {context}\nAnswer:")])
    store = MSAVectorStore.from_documents(documents, engine=engine)  # MSA
    retriever = store.as_retriever(search_kwargs={"k": 1})
    for use_memory, expected in (("auto", "skipped"), (False, "off"), (True, "routed")):
        llm = ChatMSA(engine=engine, max_tokens=3, use_memory=use_memory)  # MSA
        chain = {"context": retriever | format_docs, "question": RunnablePassthrough()} | prompt | llm
        msg = chain.invoke("Who repairs bicycles?")
        assert msg.response_metadata["memory"].startswith(expected)
        assert bool(msg.response_metadata["documents"]) == (use_memory is True)
    # a plain question still routes under "auto"
    msg = ChatMSA(engine=engine, max_tokens=3).invoke("Who repairs bicycles?")
    assert msg.response_metadata["memory"] == "routed" and len(msg.response_metadata["documents"]) == 2
