"""LlamaIndex surfaces on a tiny random model (mechanics, ids, order, persistence, async; never answer quality)."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document  # noqa: E402
from llama_index.core.base.llms.types import ChatMessage, MessageRole  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.schema import TextNode  # noqa: E402
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters  # noqa: E402

from msa_plugins import InvalidArgumentError, MSAEngine  # noqa: E402
from msa_plugins.integrations.llama_index import (MSAIndex, MSALLM, MSAMemoryBlock, MSAQueryEngine,  # noqa: E402
                                                  MSARetriever, MSAVectorStore, NoEmbedding, load_msa_index)

DOCS = [
    Document(text="Paris is the capital of France. The Seine runs through it.", id_="france",
             metadata={"country": "fr", "year": 2001}),
    Document(text="Alice was born in 1990 in Lisbon and works as a painter.", id_="alice",
             metadata={"country": "pt", "year": 1990}),
    Document(text="The quick brown fox jumps over the lazy dog.", id_="fox", metadata={"country": "uk", "year": 2010}),
]
GEN = dict(max_new_tokens=4)
RETRIEVER_FREE = dict(mode="interleave", max_new_tokens=4)  # MSAQueryEngine: the engine routes and answers in one call


def all_documents(engine):
    """Every memory document, whatever its collection."""
    return list(engine.snapshot().documents(collection="*"))


def nodes_of(index):
    """The index's nodes, as its vector store holds them (MSAVectorStore keeps text: the docstore holds none)."""
    return index.vector_store.get_nodes()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # LlamaIndex's chat engines reserve ~500 tokens of window: use a tiny llama with a 4K window
    from tiny_models import make_tiny_model
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("llama4k")), max_position_embeddings=4096)


@pytest.fixture()
def engine(model_dir):
    return MSAEngine.from_pretrained(model_dir, device="cpu", k=2)


@pytest.fixture()
def index(engine):
    return MSAIndex.from_documents(DOCS, engine=engine)


def test_from_documents_keeps_ids_metadata_and_node_parser(engine):
    splitter = SentenceSplitter(chunk_size=12, chunk_overlap=0)
    index = MSAIndex.from_documents(DOCS, engine=engine, transformations=[splitter])
    nodes = nodes_of(index)
    assert len(nodes) > len(DOCS)  # the splitter ran
    assert sorted(engine.snapshot().ids) == sorted(n.node_id for n in nodes)
    for n in nodes:
        doc = engine.get([n.node_id])[0]
        assert doc.metadata["ref_doc_id"] == n.ref_doc_id
        assert doc.metadata["country"] == n.metadata["country"]
        assert n.get_content() in doc.text
    assert {n.ref_doc_id for n in nodes} == {"france", "alice", "fox"}
    assert set(index.docstore.get_all_document_hashes().values()) == {"france", "alice", "fox"}


def test_insert_delete_refresh(index, engine):
    index.insert(Document(text="Berlin is the capital of Germany.", id_="germany", metadata={"country": "de"}))
    assert len(engine) == 4 and "germany" in {n.ref_doc_id for n in nodes_of(index)}
    index.insert_nodes([TextNode(text="A loose node.", id_="loose")])
    assert "loose" in engine.snapshot()
    index.delete_ref_doc("alice", delete_from_docstore=True)
    assert len(engine) == 4 and "alice" not in {n.ref_doc_id for n in nodes_of(index)}
    assert all(d.metadata.get("ref_doc_id") != "alice" for d in engine.snapshot().documents())
    changed = Document(text="Paris is the capital of France and its largest city.", id_="france",
                       metadata={"country": "fr", "year": 2001})
    assert index.refresh_ref_docs([DOCS[2], changed]) == [False, True]
    texts = [d.text for d in engine.snapshot().documents() if d.metadata.get("ref_doc_id") == "france"]
    assert len(texts) == 1 and "largest city" in texts[0] and len(engine) == 4
    index.delete_nodes(["no-such-node"])  # as every LlamaIndex vector store: unknown ids are ignored
    index.delete_nodes(["loose"])
    assert len(engine) == 3


def test_persist_and_load(index, engine, model_dir, tmp_path):
    from llama_index.core import StorageContext, load_index_from_storage

    index.storage_context.persist(persist_dir=str(tmp_path))
    fresh = MSAEngine.from_pretrained(model_dir, device="cpu", k=2)
    loaded = load_msa_index(str(tmp_path), fresh)
    assert fresh.snapshot().ids == engine.snapshot().ids
    assert loaded.docstore.get_all_document_hashes() == index.docstore.get_all_document_hashes()
    a = index.as_retriever().retrieve("Where was Alice born?")
    b = loaded.as_retriever().retrieve("Where was Alice born?")
    assert [n.node_id for n in a] == [n.node_id for n in b]
    assert [n.score for n in a] == pytest.approx([n.score for n in b])
    assert b[0].node.metadata == a[0].node.metadata and b[0].node.ref_doc_id == a[0].node.ref_doc_id
    with pytest.raises(FileNotFoundError):
        load_msa_index(str(tmp_path / "nothing"), fresh)
    # never replaces what an engine holds unless asked
    with pytest.raises(ValueError, match="replace=True"):
        load_msa_index(str(tmp_path), fresh)
    assert len(load_msa_index(str(tmp_path), fresh, replace=True).vector_store.get_nodes()) == 3
    # LlamaIndex's own loader cannot know the engine: it fails and names load_msa_index (never an empty index)
    with pytest.raises(ValueError, match="load_msa_index"):
        load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path)))
    # ... and with the store passed in, LlamaIndex's loader works unchanged
    same = load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path),
                                                                vector_store=MSAVectorStore(fresh)),
                                   embed_model=NoEmbedding())
    assert [n.node_id for n in same.as_retriever().retrieve("Where was Alice born?")] == [n.node_id for n in b]


def test_query_engine_sources_are_routing_in_order(index, engine):
    routed = engine.retrieve("Where was Alice born?", k=2)
    standard = index.as_query_engine(**GEN).query("Where was Alice born?")  # LlamaIndex's RetrieverQueryEngine
    assert [n.node_id for n in standard.source_nodes] == [d.id for d in routed]
    assert [n.score for n in standard.source_nodes] == pytest.approx([d.score for d in routed])
    qe = index.as_query_engine(**RETRIEVER_FREE)
    assert isinstance(qe, MSAQueryEngine)
    resp = qe.query("Where was Alice born?")
    assert [n.node_id for n in resp.source_nodes] == [d.id for d in routed]
    assert [n.score for n in resp.source_nodes] == pytest.approx([d.score for d in routed])
    assert resp.source_nodes[0].node.ref_doc_id in {"france", "alice", "fox"}
    t, u = resp.metadata["timings"], resp.metadata["usage"]
    assert {"routing_s", "first_token_s", "total_s"} <= set(t) and t["total_s"] > 0
    assert u["completion_tokens"] >= 1 and u["prompt_tokens"] > 0
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert str(resp) == engine.query("Where was Alice born?", k=2, **GEN).answer
    # multi-hop: k_per_round=False gives k documents in all, split over the rounds as engine.retrieve splits them
    hops = index.as_query_engine(similarity_top_k=2, rounds=2, k_per_round=False, **RETRIEVER_FREE)
    resp = hops.query("Where was Alice born?")
    assert [(n.node_id, r["round"]) for n, r in zip(resp.source_nodes, resp.metadata["routed"])] == \
        [(d.id, d.round) for d in engine.retrieve("Where was Alice born?", k=2, rounds=2)] == \
        [(resp.source_nodes[0].node_id, 0), (resp.source_nodes[1].node_id, 1)]
    # MSARetriever routes multi-hop too: k nodes in all over the rounds, as the engine splits them, also inside
    # LlamaIndex's own RetrieverQueryEngine
    from llama_index.core.query_engine import RetrieverQueryEngine

    from msa_plugins.integrations.llama_index import MSARetriever

    two_hop = MSARetriever(engine, similarity_top_k=3, rounds=2)
    want = [d.id for d in engine.retrieve("Where was Alice born?", k=3, rounds=2)]
    assert [n.node_id for n in two_hop.retrieve("Where was Alice born?")] == want
    reranked = MSARetriever(engine, similarity_top_k=2, rerank=4).retrieve("Where was Alice born?")
    assert [(n.node_id, n.score) for n in reranked] == \
        [(d.id, d.score) for d in engine.retrieve("Where was Alice born?", k=2, rerank=4)]
    synthesized = RetrieverQueryEngine.from_args(two_hop, llm=MSALLM(engine=engine, **GEN))
    assert [n.node_id for n in synthesized.query("Where was Alice born?").source_nodes] == want
    # retrieve() gives the documents query() answers from, rounds included (k in all, or k per round)
    for qe in (hops, index.as_query_engine(similarity_top_k=1, rounds=2, **RETRIEVER_FREE)):
        answered = qe.query("Where was Alice born?")
        assert [n.node_id for n in qe.retrieve("Where was Alice born?")] == \
            [n.node_id for n in answered.source_nodes]
        assert [r["round"] for r in answered.metadata["routed"]] == [0, 1]
    reranking = index.as_query_engine(similarity_top_k=2, rerank=3, **RETRIEVER_FREE)
    assert [n.node_id for n in reranking.query("Where was Alice born?").source_nodes] == \
        [n.node_id for n in reranking.retrieve("Where was Alice born?")] == \
        [d.id for d in engine.retrieve("Where was Alice born?", k=2, rerank=3)]
    with pytest.raises(ValueError, match="pass mode= too"):
        index.as_query_engine(rerank=3)


def test_streaming_and_async_match_sync(index):
    q = "What is the capital of France?"
    sync = index.as_query_engine(**RETRIEVER_FREE).query(q)
    streamed = index.as_query_engine(streaming=True, **RETRIEVER_FREE).query(q)
    assert [n.node_id for n in streamed.source_nodes] == [n.node_id for n in sync.source_nodes]
    pieces = list(streamed.response_gen)
    assert "".join(pieces).strip() == str(sync)
    assert streamed.metadata["usage"]["completion_tokens"] == sync.metadata["usage"]["completion_tokens"]
    resp = asyncio.run(index.as_query_engine(**RETRIEVER_FREE).aquery(q))
    assert str(resp) == str(sync)

    async def astream():
        r = await index.as_query_engine(streaming=True, **RETRIEVER_FREE).aquery(q)
        return "".join([p async for p in r.async_response_gen()])
    assert asyncio.run(astream()).strip() == str(sync)


def test_metadata_filters_restrict_routing(index):
    filters = MetadataFilters(filters=[MetadataFilter(key="country", value="pt")])
    resp = index.as_query_engine(filters=filters, similarity_top_k=3, **GEN).query("Who is a painter?")
    assert [n.node.ref_doc_id for n in resp.source_nodes] == ["alice"]
    gt = MetadataFilters(filters=[MetadataFilter(key="year", value=2000, operator=FilterOperator.GT)])
    nodes = index.as_retriever(filters=gt, similarity_top_k=3).retrieve("a city")
    assert sorted(n.node.ref_doc_id for n in nodes) == ["fox", "france"]
    none = MetadataFilters(filters=[MetadataFilter(key="country", value="zz")])
    assert index.as_retriever(filters=none).retrieve("a city") == []
    assert index.as_query_engine(filters=none, **GEN).query("a city").source_nodes == []
    bad = MetadataFilters(filters=[MetadataFilter(key="country", value=3, operator=FilterOperator.GT)])
    with pytest.raises(TypeError, match="cannot be compared"):
        index.as_retriever(filters=bad).retrieve("a city")
    with pytest.raises(TypeError, match="keys must be str"):
        index.as_retriever(filters={3: "x"})


@pytest.mark.parametrize("args", [GEN, RETRIEVER_FREE], ids=["retriever_query_engine", "msa_query_engine"])
def test_bad_queries(index, args):
    qe = index.as_query_engine(**args)
    with pytest.raises(ValueError, match="empty"):
        qe.query("   ")
    with pytest.raises(ValueError):  # LlamaIndex's own pydantic validation, as for VectorStoreIndex
        qe.query(42)
    if isinstance(qe, MSAQueryEngine):
        with pytest.raises(TypeError, match="must be a str"):
            qe.retrieve(42)


def test_concurrent_queries_equal_serial(index):
    qe = index.as_query_engine(**GEN)
    questions = ["Where was Alice born?", "What is the capital of France?", "What does the fox do?"]
    serial = [(str(r), [n.node_id for n in r.source_nodes]) for r in map(qe.query, questions)]
    with ThreadPoolExecutor(3) as ex:
        parallel = [(str(r), [n.node_id for n in r.source_nodes]) for r in ex.map(qe.query, questions)]
    assert parallel == serial

    async def gather():
        return await asyncio.gather(*(qe.aquery(q) for q in questions))
    assert [(str(r), [n.node_id for n in r.source_nodes]) for r in asyncio.run(gather())] == serial


def test_adds_during_queries_never_half_visible(index, engine):
    qe = index.as_query_engine(**GEN)
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            r = qe.query("Where was Alice born?")
            seen.append(len(r.source_nodes))
            snap = engine.snapshot()  # one consistent view: every id has its document, text and metadata
            docs = list(snap.documents())
            assert [d.id for d in docs] == snap.ids and len(docs) == len(snap)
            assert all(d.text and d.n_tokens > 0 for d in docs)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(3):
        index.insert(Document(text=f"Extra fact number {i} about Lisbon.", id_=f"extra{i}"))
    stop.set()
    t.join()
    assert seen and all(n == 2 for n in seen) and len(engine) == 6


def test_llm_complete_chat_stream_and_async(engine):
    llm = MSALLM(engine=engine, max_new_tokens=4)
    direct = engine.generate("Where is Paris?", max_new_tokens=4)
    c = llm.complete("Where is Paris?")
    assert c.text == direct.text and c.raw["usage"]["completion_tokens"] == direct.completion_tokens
    assert "total_s" in c.raw["timings"]
    streamed = list(llm.stream_complete("Where is Paris?"))
    assert streamed[-1].text == direct.text and "".join(r.delta for r in streamed) == direct.text
    assert streamed[-1].raw["usage"]["prompt_tokens"] == direct.prompt_tokens
    msgs = [ChatMessage(role=MessageRole.USER, content="Where is Paris?")]
    assert llm.chat(msgs).message.content == direct.text
    assert [r.delta for r in llm.stream_chat(msgs)][-1] == ""
    with pytest.raises(ValueError):
        llm.complete("")
    with pytest.raises(TypeError):
        llm.complete(5)

    async def with_ticker():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # let the ticker start
        before = ticks
        r = await llm.achat(msgs)
        during = ticks - before  # a call that blocked the loop would let the ticker run not once
        parts = [x.delta async for x in await llm.astream_complete("Where is Paris?")]
        done.set()
        await task
        return r, parts, during
    r, parts, during = asyncio.run(with_ticker())
    assert r.message.content == direct.text and "".join(parts) == direct.text
    assert during >= 1  # the event loop kept running while the model generated (not a timing threshold)


def test_chat_engine_uses_msa_llm_and_routing(index):
    from llama_index.core.memory import Memory

    # the tiny model's 256-token window is below LlamaIndex's default chat-memory reserve: pass a memory
    chat = index.as_chat_engine(chat_mode="context", llm=MSALLM(engine=index.engine, max_new_tokens=4),
                                similarity_top_k=2, memory=Memory.from_defaults(token_limit=100))
    resp = chat.chat("Where was Alice born?")
    assert isinstance(resp.response, str)
    assert len(resp.source_nodes) == 2
    assert all(n.node.ref_doc_id in {"france", "alice", "fox"} for n in resp.source_nodes)
    default = index.as_chat_engine(memory=Memory.from_defaults(token_limit=100))  # CONDENSE_PLUS_CONTEXT with MSALLM, never OpenAI
    assert isinstance(default._llm, MSALLM)


def test_memory_block_inside_memory(engine):
    from llama_index.core.memory import Memory

    block = MSAMemoryBlock(name="msa", engine=engine, scope="user-1", k=2)
    other = MSAMemoryBlock(name="msa2", engine=engine, scope="user-2", k=2)
    memory = Memory.from_defaults(session_id="s1", token_limit=40, chat_history_token_ratio=0.5,
                                  token_flush_size=10, memory_blocks=[block])

    async def run():
        turns = [("user", "My cat is called Biscuit."), ("assistant", "Nice name!"),
                 ("user", "I live in Lisbon near the river."), ("assistant", "Lisbon is lovely."),
                 ("user", "My favourite colour is green."), ("assistant", "Noted.")]
        for role, text in turns:
            await memory.aput(ChatMessage(role=role, content=text))
        await memory.aput(ChatMessage(role="user", content="What is my cat called?"))
        return await memory.aget(), await other.aget([ChatMessage(role="user", content="cat?")])

    messages, other_text = asyncio.run(run())
    stored = [d for d in all_documents(engine) if d.metadata.get("msa_memory_scope") == "user-1"]
    assert stored, "flushed chat turns went into the memory bank"
    system = messages[0]
    assert system.role == MessageRole.SYSTEM and "msa" in system.content
    routed = [d.text for d in all_documents(engine) if d.text in system.content]
    assert 1 <= len(routed) <= 2
    assert other_text == ""  # another scope sees nothing


def test_memory_block_refuses_vector_memory_block_knobs(engine):
    """A port from VectorMemoryBlock passes similarity_top_k, query_kwargs, ...: pydantic dropped them
    (similarity_top_k=5 recalled 3). Each is refused, naming MSAMemoryBlock's way; LlamaIndex's own block fields
    still build."""
    from msa_plugins import InvalidArgumentError

    for knob, hint in (({"similarity_top_k": 5}, "`k=`"), ({"query_kwargs": {"filters": None}}, "scope="),
                       ({"retrieval_context_window": 5}, "latest user message"),
                       ({"collection": "m"}, "collection_name"),
                       ({"embed_model": None}, "no vector store"), ({"bogus": 1}, "unknown argument")):
        with pytest.raises(InvalidArgumentError, match=hint):
            MSAMemoryBlock(name="m", engine=engine, **knob)
    block = MSAMemoryBlock(name="m", engine=engine, k=5, description="facts", priority=1, collection_name="mem",
                           accept_short_term_memory=True)
    assert (block.k, block.priority, block.collection_name) == (5, 1, "mem")


def test_memory_block_keeps_sessions_apart_like_vector_memory_block(engine):
    """LlamaIndex's Memory passes its session_id to every block; a memory put under one session must not be
    recalled under another (VectorMemoryBlock filters on it: leaking it would show one user another's turns)."""
    from llama_index.core.memory import Memory, VectorMemoryBlock

    vector = VectorMemoryBlock(name="vec", vector_store=MSAVectorStore(engine, collection_name="vec"),
                               embed_model=NoEmbedding())
    block = MSAMemoryBlock(name="msa", engine=engine, k=3)
    secret = ChatMessage(role="user", content="My bank PIN is 4921.")
    ask = [ChatMessage(role="user", content="What is my bank PIN?")]

    async def recall(b):
        await b.aput([secret.model_copy(deep=True)], from_short_term_memory=True, session_id="alice")
        return (await b.aget(ask, session_id="bob"), await b.aget(ask, session_id="alice"), await b.aget(ask))

    assert asyncio.run(recall(vector))[0] == ""  # the framework's own block: bob sees nothing
    bob, alice, unscoped = asyncio.run(recall(block))
    assert bob == ""
    assert alice == unscoped == "user: My bank PIN is 4921."
    [doc] = [d for d in all_documents(engine) if d.metadata.get("msa_memory_scope") == "default"]
    assert doc.metadata["session_id"] == "alice"

    # through Memory itself: its session_id reaches the block on both put (flush) and get
    memory = Memory.from_defaults(session_id="carol", token_limit=40, chat_history_token_ratio=0.5,
                                  token_flush_size=10, memory_blocks=[block])

    async def chat():
        for role, text in [("user", "My cat is called Biscuit."), ("assistant", "Nice name!"),
                           ("user", "I live in Lisbon near the river."), ("assistant", "Lisbon is lovely.")]:
            await memory.aput(ChatMessage(role=role, content=text))

    asyncio.run(chat())
    assert {d.metadata.get("session_id") for d in all_documents(engine)
            if d.metadata.get("msa_memory_scope") == "default"} == {"alice", "carol"}
    assert asyncio.run(block.aget([ChatMessage(role="user", content="cat?")], session_id="bob")) == ""


def test_memory_block_inside_function_agent_run(engine):
    """The agent's LLM here is LlamaIndex's MockFunctionCallingLLM recording what it is shown (a random model
    cannot be relied on to answer); the thing under test, MSAMemoryBlock inside the agent's Memory, is real."""
    from llama_index.core.agent.workflow import FunctionAgent
    from llama_index.core.llms.mock import MockFunctionCallingLLM
    from llama_index.core.memory import Memory

    seen = []

    def respond(messages, **kw):
        seen.append(list(messages))
        return ChatMessage(role="assistant", content="Okay, I will remember that.")

    agent = FunctionAgent(tools=[], llm=MockFunctionCallingLLM(response_generator=respond, is_chat_model=True))
    block = MSAMemoryBlock(name="long_term", engine=engine, scope="agent-user", k=2)
    memory = Memory.from_defaults(session_id="agent", token_limit=60, chat_history_token_ratio=0.3,
                                  token_flush_size=20, memory_blocks=[block])

    async def run():
        for msg in ["My cat is called Biscuit and she is orange.", "I live in Lisbon near the river Tagus.",
                    "My favourite colour is green like grass.", "What is my cat called?"]:
            await agent.run(user_msg=msg, memory=memory)
    asyncio.run(run())
    stored = [d.text for d in all_documents(engine) if d.metadata.get("msa_memory_scope") == "agent-user"]
    assert stored, "turns flushed from short-term memory went into the bank"
    last_system = " ".join(m.content for m in seen[-1] if m.role == MessageRole.SYSTEM and m.content)
    assert "long_term" in last_system and any(t in last_system for t in stored)


# ---------------------------------------------------------------------------------------------- the package surface
def test_public_names_are_pinned():
    import msa_plugins.integrations.llama_index as pkg

    assert sorted(pkg.__all__) == sorted([
        "MSAVectorStore", "NoEmbedding", "MSAIndex", "MSAQueryEngine", "MSARetriever", "MSALLM", "ToolCallError",
        "MSAMemoryBlock", "load_msa_index", "filters_to_allow_ids", "filters_to_predicate"])
    assert all(getattr(pkg, name) is not None for name in pkg.__all__)


def test_filter_mistakes_get_the_shared_error_types(index, engine):
    from msa_plugins import InvalidArgumentError, InvalidTypeError
    from msa_plugins.integrations.llama_index import filters_to_allow_ids, filters_to_predicate

    with pytest.raises(InvalidTypeError, match="MetadataFilters"):
        index.as_retriever(filters=["country", "pt"])
    with pytest.raises(InvalidTypeError, match="keys must be str"):
        index.as_query_engine(filters={3: "x"})
    with pytest.raises(InvalidTypeError, match="needs a list"):
        filters_to_predicate(MetadataFilters(filters=[MetadataFilter(key="country", value="pt",
                                                                     operator=FilterOperator.IN)]))
    bad = MetadataFilters(filters=[MetadataFilter(key="country", value=3, operator=FilterOperator.GT)])
    with pytest.raises(InvalidTypeError, match="'france'|'alice'|'fox'"):  # names the document
        index.as_query_engine(filters=bad, **GEN).query("a city")
    with pytest.raises(InvalidArgumentError):
        index.as_retriever(similarity_top_k=0)
    with pytest.raises(InvalidTypeError):
        index.as_query_engine(similarity_top_k="3")
    with pytest.raises(InvalidArgumentError):
        index.as_query_engine(max_new_tokens=-1)
    # nested filters (LlamaIndex's own in-memory filter refuses them), dicts, and the allow-list helper
    nested = MetadataFilters(condition="or", filters=[
        MetadataFilter(key="country", value="pt"),
        MetadataFilters(filters=[MetadataFilter(key="year", value=2005, operator=FilterOperator.GT),
                                 MetadataFilter(key="country", value=["uk", "de"], operator=FilterOperator.IN)])])
    nodes = index.as_retriever(filters=nested, similarity_top_k=3).retrieve("a city")
    assert sorted(n.node.ref_doc_id for n in nodes) == ["alice", "fox"]
    assert [n.node.ref_doc_id for n in index.as_retriever(filters={"country": "fr"}).retrieve("a city")] == ["france"]
    allowed = filters_to_allow_ids(engine, {"country": "pt"})
    assert [engine.get([i])[0].metadata["ref_doc_id"] for i in allowed] == ["alice"]
    assert filters_to_allow_ids(engine, None) is None


def test_nothing_to_answer_from_gives_empty_response_without_generating(engine):
    empty = MSAIndex(nodes=[], engine=engine)
    standard = empty.as_query_engine(**GEN).query("Where was Alice born?")
    assert str(standard) == "Empty Response" and standard.source_nodes == []
    resp = empty.as_query_engine(**RETRIEVER_FREE).query("Where was Alice born?")
    assert str(resp) == "Empty Response" and resp.source_nodes == []
    assert resp.metadata["usage"]["completion_tokens"] == 0
    streamed = empty.as_query_engine(streaming=True, **RETRIEVER_FREE).query("Where was Alice born?")
    assert "".join(streamed.response_gen) == "Empty Response"
    assert empty.as_retriever().retrieve("Where was Alice born?") == []


def test_llm_refuses_knobs_it_does_not_read(engine):
    """Code written for another LlamaIndex LLM passes its own knobs (OpenAI's max_tokens): a drop-in must not
    generate 128 tokens while the caller asked for 3."""
    from msa_plugins import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        MSALLM(engine=engine, num_output=3)
    llm = MSALLM(engine=engine, max_new_tokens=3, system_prompt="Be brief.")  # LlamaIndex's own LLM fields pass
    msg = [ChatMessage(role=MessageRole.USER, content="Hi")]
    for call in (lambda: llm.complete("Hi", top_p=0.1), lambda: asyncio.run(llm.achat(msg, bogus=1)),
                 lambda: llm.stream_chat(msg, top_k=3), lambda: llm.chat(msg, extra_body={"max_tokens": 1})):
        with pytest.raises(InvalidArgumentError, match="does not support"):
            call()
    assert llm.chat(msg, max_new_tokens=2).raw["usage"]["completion_tokens"] <= 2
    # OpenAI's max_tokens is honoured as max_new_tokens (per call and as a field), never ignored
    assert MSALLM(engine=engine, max_tokens=2).max_new_tokens == 2
    assert llm.chat(msg, max_tokens=1, temperature=0).raw["usage"]["completion_tokens"] <= 1
    with pytest.raises(InvalidArgumentError, match="disagree"):
        llm.chat(msg, max_tokens=1, max_new_tokens=5)


def test_document_context_extractor_runs_on_msa_llm(engine):
    """LlamaIndex's DocumentContextExtractor calls achat(max_tokens=..., extra_headers=...) and turns any error
    into a warning and a node without context: refusing those knobs made it a silent no-op."""
    from llama_index.core import Document
    from llama_index.core.extractors import DocumentContextExtractor
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.storage.docstore import SimpleDocumentStore

    doc = Document(text="Alice was born in Lisbon. She studied in Porto. " * 4, id_="bio")
    docstore = SimpleDocumentStore()
    docstore.add_documents([doc])
    nodes = SentenceSplitter(chunk_size=32, chunk_overlap=0)([doc])
    extractor = DocumentContextExtractor(docstore=docstore, llm=MSALLM(engine=engine), max_output_tokens=3,
                                         max_context_length=2000)
    extracted = asyncio.run(extractor.aextract(nodes))
    assert len(nodes) > 1 and all("context" in m for m in extracted)
    assert all(engine.count_tokens(m["context"]) <= 4 for m in extracted)


def test_llm_options_stop_early_close_and_serialization(engine):
    llm = MSALLM(engine=engine, max_new_tokens=6)
    direct = engine.generate("Where is Paris?", max_new_tokens=6)
    assert llm.metadata.num_output == 6 and llm.metadata.context_window == engine.context_window
    assert llm.complete("Where is Paris?", max_new_tokens=2).raw["usage"]["completion_tokens"] <= 2
    if len(direct.text) > 2:  # a stop string taken from the model's own output cuts the text before it
        stop = direct.text[2:4]
        assert stop not in llm.complete("Where is Paris?", stop=[stop]).text
    # a consumer that stops after the first piece still gets the generator closed (no dangling generation)
    gen = llm.stream_chat([ChatMessage(role=MessageRole.USER, content="Where is Paris?")])
    first = next(gen)
    gen.close()
    assert first.delta

    async def first_async_piece():
        agen = await llm.astream_complete("Where is Paris?")
        async for chunk in agen:
            await agen.aclose()
            return chunk
    assert asyncio.run(first_async_piece()).delta
    assert '"max_new_tokens": 6' in llm.to_json()  # the engine is private state, not a field to serialize
    with pytest.raises(TypeError):
        MSALLM(engine=None)


def test_llm_events_once_per_call_sync_and_async(engine):
    """LlamaIndex instrumentation (token counters, tracers) sees one chat start/end per chat call, sync or
    async, and the end event carries the response with its usage."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMChatStartEvent

    events = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs):
            if isinstance(event, (LLMChatStartEvent, LLMChatEndEvent)):
                events.append(event)

    dispatcher = get_dispatcher()  # the root: every LlamaIndex event propagates to it
    handler = Recorder()
    dispatcher.add_event_handler(handler)
    try:
        llm = MSALLM(engine=engine, max_new_tokens=3)
        msgs = [ChatMessage(role=MessageRole.USER, content="Where is Paris?")]
        llm.chat(msgs)
        sync_events = list(events)
        events.clear()
        asyncio.run(llm.achat(msgs))
        async_events = list(events)
        events.clear()

        async def drain():
            return [c async for c in await llm.astream_chat(msgs)]
        chunks = asyncio.run(drain())
    finally:
        dispatcher.event_handlers.remove(handler)
    assert [type(e) for e in sync_events] == [type(e) for e in async_events] == [LLMChatStartEvent, LLMChatEndEvent]
    assert sync_events[-1].response.raw["usage"]["completion_tokens"] >= 1
    assert [type(e) for e in events].count(LLMChatStartEvent) == 1 and chunks[-1].raw["usage"]["total_tokens"] > 0


def test_tool_call_protocol_parses_and_validates_replies():
    """The JSON tool protocol's parser: valid calls come out with validated arguments; a JSON object that is
    not a valid call is an error naming the problem (sent back to the model); prose without JSON is no call."""
    from llama_index.core.tools import FunctionTool

    from msa_plugins.integrations.llama_index.llms import parse_tool_calls

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tools = [FunctionTool.from_defaults(add)]
    [call] = parse_tool_calls('Sure.\n```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n```', tools)
    assert call["name"] == "add" and call["arguments"] == {"a": 2, "b": 3} and call["id"].startswith("call_")
    assert parse_tool_calls('{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 1}"}', tools)[0]["arguments"] == \
        {"a": 1, "b": 1}
    assert parse_tool_calls("The answer is five.", tools) == []
    with pytest.raises(ValueError, match="unknown tool 'mul'"):
        parse_tool_calls('{"name": "mul", "arguments": {"a": 2, "b": 3}}', tools)
    with pytest.raises(ValueError, match="do not match its schema.*b"):
        parse_tool_calls('{"name": "add", "arguments": {"a": 2}}', tools)
    assert len(parse_tool_calls('[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                                '{"name": "add", "arguments": {"a": 3, "b": 4}}]', tools)) == 2


def test_function_calling_llm_without_a_valid_call(engine):
    """A random model never emits a valid call: chat_with_tools returns its text (not required) or raises
    ToolCallError after max_retries + 1 attempts (required); usage sums every attempt."""
    from llama_index.core.tools import FunctionTool

    from msa_plugins.integrations.llama_index import ToolCallError

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = MSALLM(engine=engine, max_new_tokens=3, max_retries=1)
    tool = FunctionTool.from_defaults(add)
    response = llm.chat_with_tools([tool], user_msg="What is 2 + 3?")
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    assert response.raw["usage"]["prompt_tokens"] > 0
    with pytest.raises(ToolCallError, match="2 attempts"):
        llm.chat_with_tools([tool], user_msg="What is 2 + 3?", tool_required=True)
    with pytest.raises(ToolCallError, match="without calling a tool"):
        llm.get_tool_calls_from_response(response)
    assert llm.count_tokens("Where is Paris?") == engine.count_tokens("Where is Paris?") > 0


def test_tool_choice_follows_openai_semantics(engine):
    """LlamaIndex passes OpenAI's tool_choice (structured_predict always does, FunctionAgent with
    initial_tool_choice): a tool's name offers that tool alone and requires a call, "required" requires one,
    "none" is a plain chat, a name that is no tool is refused."""
    from llama_index.core.tools import FunctionTool

    from msa_plugins import InvalidArgumentError
    from msa_plugins.integrations.llama_index import ToolCallError

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tools = [FunctionTool.from_defaults(add), _weather_tool()]
    llm = MSALLM(engine=engine, max_new_tokens=3, max_retries=0)
    for choice in ("get_weather", {"type": "function", "function": {"name": "get_weather"}}):
        prepared = llm._prepare_chat_with_tools(tools, user_msg="Weather in Rome?", tool_choice=choice)
        assert [t.metadata.name for t in prepared["tools"]] == ["get_weather"] and prepared["tool_required"]
        assert "get_weather" in prepared["messages"][0].content and "add" not in prepared["messages"][0].content
        assert "tool_choice" not in prepared
    assert llm._prepare_chat_with_tools(tools, user_msg="2 + 3?", tool_choice="required")["tool_required"]
    with pytest.raises(ToolCallError, match="1 attempts"):  # a random model never calls: required fails loudly
        llm.chat_with_tools(tools, user_msg="Weather in Rome?", tool_choice="get_weather")
    plain = llm.chat_with_tools(tools, user_msg="Weather in Rome?", tool_choice="none")
    assert "tool_format" not in plain.raw  # no tool shown: exactly a plain chat
    assert plain.raw["usage"]["prompt_tokens"] == llm.chat(
        [ChatMessage(role=MessageRole.USER, content="Weather in Rome?")]).raw["usage"]["prompt_tokens"]
    with pytest.raises(InvalidArgumentError, match="names no tool"):
        llm.chat_with_tools(tools, user_msg="2 + 3?", tool_choice="multiply")


# a Qwen2/Qwen3-style chat template, cut down: a tools block in the system turn, calls in <tool_call> tags
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\nFor each call, "
    "return <tool_call>{\"name\": <function-name>, \"arguments\": <args-json-object>}</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


@pytest.fixture(scope="module")
def tools_model_dir(model_dir, tmp_path_factory):
    """The tiny model with a chat template that renders tools, as a user's Qwen folder has."""
    import shutil

    from transformers import AutoTokenizer
    out = str(tmp_path_factory.mktemp("tools_template") / "model")
    shutil.copytree(model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    tok.save_pretrained(out)
    return out


def _weather_tool():
    from llama_index.core.tools import FunctionTool

    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    return FunctionTool.from_defaults(get_weather)


def test_tools_go_through_a_chat_template_that_renders_them(tools_model_dir, engine):
    from transformers import AutoTokenizer

    from msa_plugins.integrations.llama_index import ToolCallError
    from msa_plugins.integrations.llama_index.llms import _openai_tool

    tool = _weather_tool()
    native = MSAEngine.from_pretrained(tools_model_dir, device="cpu", k=2)
    assert native.supports_tools and not engine.supports_tools
    llm = MSALLM(engine=native, max_new_tokens=3, max_retries=0)
    response = llm.chat_with_tools([tool], user_msg="Weather in Rome?")
    assert response.raw["tool_format"] == "chat_template" and response.raw["attempts"] == 1
    # the prompt is the template's rendering of the question with the schemas (no JSON protocol in a system turn)
    tok = AutoTokenizer.from_pretrained(tools_model_dir)
    question = [{"role": "user", "content": "Weather in Rome?"}]
    expected = tok.apply_chat_template(question, tools=[_openai_tool(tool)], tokenize=False, add_generation_prompt=True)
    assert "get_weather" in expected
    assert response.raw["usage"]["prompt_tokens"] == len(tok(expected, add_special_tokens=False)["input_ids"])
    assert response.raw["usage"]["prompt_tokens"] > native.generate(question, max_new_tokens=1).prompt_tokens
    # a required call: the template shows the tools, the system turn only says a call is required
    prepared = llm._prepare_chat_with_tools([tool], user_msg="Weather in Rome?", tool_required=True)
    assert prepared["messages"][0].content == "You must call one of the tools."
    with pytest.raises(ToolCallError, match="2 attempts"):
        MSALLM(engine=native, max_new_tokens=3, max_retries=1).chat_with_tools([tool], user_msg="Weather in Rome?",
                                                                               tool_required=True)
    # a template without a tools block keeps the JSON protocol
    plain = MSALLM(engine=engine, max_new_tokens=3, max_retries=0).chat_with_tools([tool], user_msg="Weather?")
    assert plain.raw["tool_format"] == "json_prompt"


def test_template_tool_calls_are_parsed_and_history_uses_the_template_format():
    from msa_plugins.integrations.llama_index.llms import _to_engine_messages, parse_tool_calls

    tools = [_weather_tool()]
    reply = 'I will look {it} up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    [call] = parse_tool_calls(reply, tools)
    assert call["name"] == "get_weather" and call["arguments"] == {"city": "Rome"}
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'  # the token limit hit first
    assert parse_tool_calls(cut, tools)[0]["arguments"] == {"city": "Rome"}
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    assert [c["arguments"]["city"] for c in parse_tool_calls(two, tools)] == ["Rome", "Oslo"]
    with pytest.raises(ValueError, match="do not match its schema"):
        parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', tools)
    with pytest.raises(ValueError, match="holds no JSON"):
        parse_tool_calls("<tool_call>get_weather(Rome)</tool_call>", tools)
    history = [ChatMessage(role=MessageRole.USER, content="Weather in Rome?"),
               ChatMessage(role=MessageRole.ASSISTANT, content="",
                           additional_kwargs={"tool_calls": [{"id": "c1", "name": "get_weather",
                                                              "arguments": {"city": "Rome"}}]}),
               ChatMessage(role=MessageRole.TOOL, content="sunny", additional_kwargs={"name": "get_weather"})]
    native = _to_engine_messages(history, template_tools=True)
    assert native[1] == {"role": "assistant",
                         "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'}
    assert native[2] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert _to_engine_messages(history)[2] == {"role": "user", "content": "Result of get_weather: sunny"}


def test_a_query_bundle_asking_for_other_search_text_is_refused(index, engine):
    """HyDEQueryTransform puts a hypothetical document into custom_embedding_strs; an embedding retriever searches
    with it, MSA routes the question: dropping it silently would answer another query than the app asked for."""
    from llama_index.core.schema import QueryBundle

    hyde = QueryBundle("Where is Paris?", custom_embedding_strs=["Paris is the capital of France.", "Where is Paris?"])
    retriever, qe = MSARetriever(engine, similarity_top_k=2), index.as_query_engine()
    for call in (retriever.retrieve, qe.query):
        with pytest.raises(InvalidArgumentError, match="custom_embedding_strs"):
            call(hyde)
    plain = QueryBundle("Where is Paris?", custom_embedding_strs=["Where is Paris?"])  # only the question: fine
    plain.embedding = [0.1, 0.2]  # a vector retriever beside this one (QueryFusionRetriever) stored its embedding
    assert [n.node_id for n in retriever.retrieve(plain)] == [n.node_id for n in retriever.retrieve("Where is Paris?")]
