"""LangChain RAG tutorial part 2: history-aware retrieval chain with message history (langchain_classic)."""

import pytest

pytest.importorskip("langchain_classic")

from langchain_classic.chains import create_history_aware_retriever, create_retrieval_chain  # noqa: E402
from langchain_classic.chains.combine_documents import create_stuff_documents_chain  # noqa: E402
from langchain_core.chat_history import InMemoryChatMessageHistory  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder  # noqa: E402
from langchain_core.runnables.history import RunnableWithMessageHistory  # noqa: E402

from msa_plugins.integrations.langchain import ChatMSA, MSAVectorStore  # noqa: E402


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*InMemoryChatMessageHistory")
def test_history_aware_retrieval_chain(engine, documents):
    # vectorstore = InMemoryVectorStore.from_documents(documents, embeddings)
    vectorstore = MSAVectorStore.from_documents(documents, engine=engine)  # MSA
    retriever = vectorstore.as_retriever(search_kwargs={"k": 2, "filter": {"year": {"$gte": 2020}}})
    # llm = ChatOpenAI(model="gpt-4o-mini")
    llm = ChatMSA(engine=engine, max_tokens=4)  # MSA
    contextualize = ChatPromptTemplate.from_messages([
        ("system", "Rewrite the latest question as a standalone question."),
        MessagesPlaceholder("chat_history"), ("human", "{input}")])
    qa = ChatPromptTemplate.from_messages([
        ("system", "Answer from this context:\n\n{context}"), MessagesPlaceholder("chat_history"), ("human", "{input}")])
    history_aware = create_history_aware_retriever(llm, retriever, contextualize)
    rag_chain = create_retrieval_chain(history_aware, create_stuff_documents_chain(llm, qa))
    histories = {}
    conversational = RunnableWithMessageHistory(
        rag_chain, lambda sid: histories.setdefault(sid, InMemoryChatMessageHistory()),
        input_messages_key="input", history_messages_key="chat_history", output_messages_key="answer")

    cfg = {"configurable": {"session_id": "s1"}}
    first = conversational.invoke({"input": "Who repairs bicycles?"}, config=cfg)
    second = conversational.invoke({"input": "On which day does it happen?"}, config=cfg)
    for out in (first, second):
        assert isinstance(out["answer"], str) and 1 <= len(out["context"]) <= 2
        assert all(d.metadata["year"] >= 2020 for d in out["context"])  # the filter is honoured
    assert len(histories["s1"].messages) == 4
