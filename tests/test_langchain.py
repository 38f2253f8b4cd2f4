"""ChatMSA / MSARetriever / MSAVectorStore / MSAStore mechanics on a tiny random model (greedy, deterministic)."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402

from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAEngine  # noqa: E402
from msa_plugins.integrations.langchain import ChatMSA, MSARetriever, MSAStore, MSAVectorStore  # noqa: E402

FACTS = ["Paris is the capital of France.", "Alice was born in 1990 in Lisbon.",
         "The quick brown fox jumps over the lazy dog.", "Memory sparse attention routes each question."]
META = [{"topic": "geo", "year": 2001}, {"topic": "people", "year": 1990}, {"topic": "animals", "year": 2010},
        {"topic": "ml", "year": 2025}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import make_tiny_model
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("llama2k")), max_position_embeddings=2048)


@pytest.fixture()
def engine(model_dir):
    e = MSAEngine.from_pretrained(model_dir, device="cpu", k=2)
    e.add(FACTS, ids=["f0", "f1", "f2", "f3"], metadata=META, progress=False)
    return e


def test_chat_invoke_carries_documents_usage_timings(engine):
    chat = ChatMSA(engine=engine, max_tokens=5)
    msg = chat.invoke("Where was Alice born?")
    ref = engine.query("Where was Alice born?", max_new_tokens=5)
    assert isinstance(msg, AIMessage) and msg.content.strip() == ref.answer  # engine.query strips; chat keeps raw pieces
    assert [d["id"] for d in msg.response_metadata["documents"]] == [d.id for d in ref.documents]
    assert [d["score"] for d in msg.response_metadata["documents"]] == pytest.approx([d.score for d in ref.documents])
    assert msg.usage_metadata == {"input_tokens": ref.prompt_tokens, "output_tokens": ref.completion_tokens,
                                  "total_tokens": ref.prompt_tokens + ref.completion_tokens}
    assert {"routing_s", "first_token_s", "total_s"} <= set(msg.response_metadata["timings"])
    # history and system messages reach the engine
    convo = [SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello"), HumanMessage("Where was Alice born?")]
    ref2 = engine.query("Where was Alice born?", max_new_tokens=5, system="Be brief.",
                        history=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert chat.invoke(convo).content.strip() == ref2.answer


def test_chat_stream_callbacks_and_stop(engine):
    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens = []

        def on_llm_new_token(self, token, **kw):
            self.tokens.append(token)

    chat = ChatMSA(engine=engine, max_tokens=6)
    full = chat.invoke("What is the capital of France?").content
    cb = Tokens()
    chunks = list(chat.stream("What is the capital of France?", config={"callbacks": [cb]}))
    assert "".join(c.content for c in chunks) == full
    assert "".join(cb.tokens) == full and len(cb.tokens) >= 2
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] == 6
    assert chunks[-1].response_metadata["documents"]
    stop = full.strip()[2:4]
    cut = chat.invoke("What is the capital of France?", stop=[stop]).content
    assert stop not in cut and full.startswith(cut)
    streamed_cut = "".join(c.content for c in chat.stream("What is the capital of France?", stop=[stop]))
    assert streamed_cut == cut


def test_chat_async_does_not_block_and_concurrency_matches_serial(engine):
    chat = ChatMSA(engine=engine, max_tokens=4)
    qs = ["Where was Alice born?", "What is the capital of France?", "What does the fox do?"]
    serial = [chat.invoke(q).content for q in qs]
    with ThreadPoolExecutor(3) as ex:
        assert list(ex.map(lambda q: chat.invoke(q).content, qs)) == serial
    assert [m.content for m in chat.batch(qs)] == serial

    async def run():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.005)
        t = asyncio.create_task(ticker())
        out = await asyncio.gather(*(chat.ainvoke(q) for q in qs))
        parts = [c.content async for c in chat.astream(qs[0])]
        done = True
        await t
        return [m.content for m in out], "".join(parts), ticks
    out, streamed, ticks = asyncio.run(run())
    assert out == serial and streamed == serial[0] and ticks >= 5


def test_chat_filters_and_bad_input(engine):
    chat = ChatMSA(engine=engine, max_tokens=3, k=4, filter={"year": {"$gte": 2001}})
    docs = chat.invoke("Tell me something").response_metadata["documents"]
    assert sorted(d["id"] for d in docs) == ["f0", "f2", "f3"]
    with pytest.raises(ValueError, match="no memory document matches"):
        ChatMSA(engine=engine, filter={"topic": "nothing"}).invoke("x?")
    with pytest.raises(InvalidTypeError, match="filter keys"):  # a wrong type is a TypeError, as in LlamaIndex
        ChatMSA(engine=engine, filter={3: "geo"}).invoke("x?")
    with pytest.raises(InvalidTypeError, match="cannot be compared"):
        ChatMSA(engine=engine, filter={"topic": {"$gt": 3}}).invoke("x?")
    with pytest.raises(ValueError, match="empty"):
        chat.invoke("   ")
    with pytest.raises(ValueError, match="text only"):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": "http://x/y.png"}])])
    with pytest.raises(ValueError, match="human message"):
        chat.invoke([SystemMessage("only a system prompt")])
    with pytest.raises(ValueError, match="cannot switch"):
        chat.invoke("hi?", model="gpt-4o")
    # ChatOpenAI(model=...) picks a model; ChatMSA's model is the engine's, and another name would be a false label
    with pytest.raises(ValueError, match="runs the engine's loaded model"):
        ChatMSA(engine=engine, model="gpt-4o-mini")
    for not_an_engine in (None, "my-model"):  # a clear error, not an AttributeError at the first use
        for surface in (ChatMSA, MSARetriever):
            with pytest.raises(InvalidTypeError, match="needs engine=MSAEngine"):
                surface(engine=not_an_engine)
    named = ChatMSA(engine=engine, model=f"some-org/{engine.model_name}", max_tokens=2)  # a hub id names it too
    assert named.invoke("hi?", model=named._name()).response_metadata["model_name"] == named._name()
    with pytest.raises(InvalidArgumentError, match="k must be"):  # per-call options are checked as AnswerOptions
        chat.invoke("hi?", k=0)
    with pytest.raises(InvalidTypeError, match="max_new_tokens"):
        chat.invoke("hi?", max_tokens="5")
    with pytest.raises(ValueError, match="tool_choice"):
        chat.bind_tools([], tool_choice="any")
    with pytest.raises(InvalidArgumentError, match="unknown argument"):  # no silent knobs
        chat.invoke("hi?", top_p=0.9)


def test_chat_memory_check_copies_no_document(engine, monkeypatch):
    """ChatMSA checks its collection, filter and (under "auto") quoting on every call: it reads shallow views of
    the documents, never deep copies (a per-call cost that grew with the memory, ~18 ms at 1.5K documents)."""
    import copy

    import msa_plugins.types as types

    engine.add(["An item of another collection."], ids=["other"], metadata=[{"year": 2030}], collection="notes",
               progress=False)
    copies, seen = [], []
    real = copy.deepcopy
    monkeypatch.setattr(types.copy, "deepcopy", lambda x, *a: copies.append(x) or real(x, *a))
    chat = ChatMSA(engine=engine, max_tokens=2, k=4, filter=lambda d: seen.append(d.id) or d.metadata["year"] > 2001)
    docs = chat.invoke("Tell me something").response_metadata["documents"]
    assert sorted(d["id"] for d in docs) == ["f2", "f3"]
    assert sorted(set(seen)) == ["f0", "f1", "f2", "f3"]  # the filter never sees the other collection
    assert len(copies) == len(docs)  # the routed documents handed out, and nothing else
    auto = ChatMSA(engine=engine, max_tokens=2, k=1, use_memory="auto")
    quoting = auto.invoke(f"Context: {FACTS[2]} {FACTS[3]}\nQuestion: which animal jumps?")
    assert quoting.response_metadata["memory"] == "skipped: the prompt already quotes 2 memory document(s)"
    assert len(copies) == len(docs)
    assert auto.invoke("Which animal jumps?").response_metadata["memory"] == "routed"
    assert len(copies) == len(docs) + 1


def test_chat_constructor_refuses_knobs_it_does_not_read(engine):
    """pydantic dropped unknown fields in silence: ChatMSA(top_p=0.1) sampled as if never told. LangChain's
    standard parameters still build (a local model has no request to retry; timeout is its own test), streaming=True
    streams, max_completion_tokens is max_tokens, and stop=[] per call clears the model's stop."""
    from langchain_core.callbacks import BaseCallbackHandler

    for knob in ({"top_p": 0.1}, {"n": 2}, {"model_kwargs": {"top_p": 0.1}}, {"presence_penalty": 1.0}):
        with pytest.raises(ValueError, match="unknown argument"):
            ChatMSA(engine=engine, **knob)
    assert ChatMSA(engine=engine, temperature=0, max_tokens=3, timeout=60, stop=[], max_retries=2,
                   api_key="unused").max_tokens == 3
    assert ChatMSA(engine=engine, max_completion_tokens=2).max_tokens == 2

    class Tokens(BaseCallbackHandler):
        seen = 0

        def on_llm_new_token(self, token, **kwargs):
            Tokens.seen += 1

    ChatMSA(engine=engine, streaming=True, max_tokens=3).invoke("hi?", config={"callbacks": [Tokens()]})
    assert Tokens.seen > 0
    assert ChatMSA(engine=engine, max_tokens=3).invoke("hi?", stream=True).usage_metadata["output_tokens"] <= 3
    full = ChatMSA(engine=engine, max_tokens=6, use_memory=False).invoke("hi?").content
    if len(full) > 3:  # a stop string from the model's own output: the model's stop cuts, a call's stop=[] clears
        cutting = ChatMSA(engine=engine, max_tokens=6, use_memory=False, stop=[full[1:3]])
        assert cutting.invoke("hi?").content != full and cutting.invoke("hi?", stop=[]).content == full


def test_chat_timeout_stops_a_call_that_runs_past_it(engine):
    """ChatOpenAI(timeout=...) fails a call that takes too long; ChatMSA(timeout=...) was accepted and ignored. Now
    it bounds routing + generation: checked between tokens, it stops the engine and raises CallTimeoutError (a
    TimeoutError), in invoke, stream, astream and tool calls alike. Without a timeout nothing changes."""
    import time

    from msa_plugins import CallTimeoutError

    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            ChatMSA(engine=engine, timeout=bad)
    full = [c.content for c in ChatMSA(engine=engine, max_tokens=8, stop=[]).stream("Where was Alice born?")]
    assert len([p for p in full if p]) >= 2  # the tiny model's greedy answer has several pieces to stop between
    assert ChatMSA(engine=engine, max_tokens=8, stop=[], timeout=600).invoke("Where was Alice born?").content == \
        "".join(full)

    # a consumer slower than the timeout: the first piece arrives, the next check stops the call
    chat = ChatMSA(engine=engine, max_tokens=8, stop=[], timeout=1.0)
    seen = []
    with pytest.raises(CallTimeoutError, match=r"timeout=1.0 s while (generating|routing)") as err:
        for chunk in chat.stream("Where was Alice born?"):
            seen.append(chunk.content)
            time.sleep(1.05)
    assert isinstance(err.value, TimeoutError)
    assert "routing" in str(err.value) or len(seen) == 1  # stopped after one piece, not after all of them

    async def slow_consumer():
        got = []
        async for chunk in chat.astream("Where was Alice born?"):
            got.append(chunk.content)
            await asyncio.sleep(1.05)
        return got

    with pytest.raises(CallTimeoutError):
        asyncio.run(slow_consumer())

    # a deadline already past when routing ends: invoke and a tool call fail before generating anything
    hasty = ChatMSA(engine=engine, max_tokens=8, timeout=1e-9)
    with pytest.raises(CallTimeoutError, match="while routing"):
        hasty.invoke("Where was Alice born?")

    def lookup(city: str) -> str:
        """Look a city up."""
        return city

    with pytest.raises(CallTimeoutError, match="while routing"):
        hasty.bind_tools([lookup], tool_choice="lookup").invoke("Where was Alice born?")
    # the engine is left usable: the same call without a timeout answers as before
    assert ChatMSA(engine=engine, max_tokens=8, stop=[]).invoke("Where was Alice born?").content == "".join(full)


def test_retriever_constructor_refuses_knobs_it_does_not_read(engine):
    """pydantic dropped them: MSARetriever(collection_name="tenant-b") searched the default collection (another
    tenant's documents), search_kwargs={"k": 1} returned k=4. Each is refused, naming MSARetriever's way; the
    BaseRetriever fields (tags, metadata) still build."""
    for knob, hint in (({"collection_name": "tenant-b"}, "collection="), ({"search_kwargs": {"k": 1}}, "pass k="),
                       ({"search_type": "mmr"}, "as_retriever"), ({"top_k": 1}, "`k=`"),
                       ({"bogus": 1}, "unknown argument")):
        with pytest.raises(ValueError, match=hint):
            MSARetriever(engine=engine, **knob)
    r = MSARetriever(engine=engine, k=1, tags=["t"], metadata={"app": "x"}, collection="default")
    assert len(r.invoke("Where was Alice born?")) == 1 and r.tags == ["t"]


def test_chat_without_memory_refuses_routing_knobs(engine):
    """ChatMSA(use_memory=False) answers with the model alone: k, filter, mode (and a collection) were accepted and
    did nothing, a bogus filter included. Now they are refused, in the constructor and per call."""
    for knob in ({"k": 2}, {"filter": {"topic": "geo"}}, {"mode": "sparse"}, {"collection": "other"}):
        with pytest.raises(ValueError, match="routes nothing"):
            ChatMSA(engine=engine, use_memory=False, **knob)
    plain = ChatMSA(engine=engine, max_tokens=3, use_memory=False)
    for call in ({"k": 2}, {"filter": {"$bogus": 1}}, {"mode": "sparse"}):
        with pytest.raises(InvalidArgumentError, match="routes nothing"):
            plain.invoke("hi?", **call)
    assert plain.invoke("hi?").response_metadata["memory"] == "off"
    assert ChatMSA(engine=engine, max_tokens=3, k=1).invoke("hi?").response_metadata["memory"] == "routed"


def test_tools_without_a_template_tool_block_use_the_json_protocol(engine):
    from langchain_core.tools import tool

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    assert not engine.supports_tools  # the tiny model's ChatML template renders no tools
    msg = ChatMSA(engine=engine, max_tokens=3, format_retries=0).bind_tools([add]).invoke("What is 2 plus 3?")
    assert msg.response_metadata["tool_format"] == "json_prompt"


def test_chat_without_memory_is_plain_generation(engine):
    chat = ChatMSA(engine=engine, max_tokens=4, use_memory=False)
    msg = chat.invoke("Where is Paris?")
    ref = engine.generate("Where is Paris?", max_new_tokens=4)
    assert msg.content == ref.text and msg.response_metadata["documents"] == []
    assert msg.usage_metadata["output_tokens"] == ref.completion_tokens


def test_retriever_routes_with_k_and_filter(engine):
    r = MSARetriever(engine=engine, k=3)
    docs = r.invoke("Where was Alice born?")
    routing = engine.route("Where was Alice born?", k=3)
    assert [d.id for d in docs] == routing.ids
    assert [d.metadata["routing_score"] for d in docs] == pytest.approx(routing.scores)
    assert len(r.invoke("Where was Alice born?", k=1)) == 1
    assert [d.id for d in r.invoke("Alice?", filter={"topic": {"$in": ["people", "ml"]}})] in (["f1", "f3"], ["f3", "f1"])
    with pytest.raises(ValueError):
        r.invoke("")
    with pytest.raises(ValueError, match="operator"):
        r.invoke("Alice?", filter={"year": {"$near": 3}})
    # multi-hop: k documents in all over the rounds, as the engine splits them, each with its round
    two_hop = MSARetriever(engine=engine, k=3, rounds=2).invoke("Where was Alice born?")
    want = engine.retrieve("Where was Alice born?", k=3, rounds=2)
    assert [(d.id, d.metadata["routing_round"]) for d in two_hop] == [(d.id, d.round) for d in want]
    assert [d.metadata["routing_round"] for d in two_hop] == [0, 0, 1]
    per_round = MSARetriever(engine=engine, k=1, rounds=2, k_per_round=True).invoke("Where was Alice born?")
    assert [(d.id, d.metadata["routing_round"]) for d in per_round] == \
        [(d.id, d.round) for d in engine.retrieve("Where was Alice born?", k=1, rounds=2, k_per_round=True)]
    assert len(per_round) == 2
    assert "routing_round" not in r.invoke("Where was Alice born?")[0].metadata  # one round: nothing added
    reranked = MSARetriever(engine=engine, k=2, rerank=4).invoke("Where was Alice born?")
    assert [(d.id, d.metadata["routing_score"]) for d in reranked] == \
        [(d.id, d.score) for d in engine.retrieve("Where was Alice born?", k=2, rerank=4)]
    with pytest.raises(ValueError, match="rerank must be >= 0"):
        MSARetriever(engine=engine, rerank=-1)
    # async passes per-call arguments on (BaseRetriever's default dropped them)
    assert [d.id for d in asyncio.run(r.ainvoke("Where was Alice born?", k=1))] == routing.ids[:1]
    # checked at construction as every surface checks them, before pydantic would coerce "2" or 1
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        MSARetriever(engine=engine, rounds=0)
    with pytest.raises(InvalidTypeError, match="rounds"):
        MSARetriever(engine=engine, rounds="2")
    with pytest.raises(InvalidTypeError, match="k_per_round must be True or False"):
        MSARetriever(engine=engine, rounds=2, k_per_round=1)
    with pytest.raises(ValueError, match="max_rounds=4"):
        MSARetriever(engine=engine, rounds=5)
    with pytest.raises(ValueError, match="set on the retriever"):
        r.invoke("Where was Alice born?", rounds=2)


def test_vector_store_mechanics(model_dir):
    eng = MSAEngine.from_pretrained(model_dir, device="cpu", k=2)
    store = MSAVectorStore.from_texts(FACTS[:2], engine=eng, metadatas=META[:2], ids=["a", "b"])
    assert store.similarity_search("anything", k=5) and len(eng) == 2
    originals = [Document(page_content="new text for a", metadata={"topic": "x"}), Document(page_content="c text")]
    ids = store.add_documents(originals, ids=["a", "c"])
    assert ids == ["a", "c"] and len(eng) == 3  # upsert: no duplicate of "a"
    assert originals[0].id is None  # caller's documents untouched
    assert store.get_by_ids(["c", "zz", "a"]) == [Document(id="c", page_content="c text"),
                                                   Document(id="a", page_content="new text for a", metadata={"topic": "x"})]
    pairs = store.similarity_search_with_score("What is new?", k=3)
    routing = eng.route("What is new?", k=3)
    assert [d.id for d, _ in pairs] == routing.ids and [s for _, s in pairs] == pytest.approx(routing.scores)
    assert [d.id for d in store.similarity_search("q?", k=3, filter={"topic": "x"})] == ["a"]
    assert [d.id for d in store.similarity_search("q?", k=3, filter=lambda d: d.id == "b")] == ["b"]
    assert store.similarity_search("q?", filter={"topic": "none"}) == []
    store.delete(["a", "missing"])  # VectorStore contract: missing ids are not an error
    assert sorted(eng.snapshot().ids) == ["b", "c"]
    rel = store.similarity_search_with_relevance_scores("q?", k=2)
    assert all(0.0 <= s <= 1.0 for _, s in rel)
    assert [d.id for d in store.as_retriever(search_kwargs={"k": 1}).invoke("q?")] == eng.route("q?", k=1).ids
    with pytest.raises(InvalidTypeError, match="filter"):
        store.similarity_search("q?", filter=["topic"])
    with pytest.raises(TypeError):
        store.add_texts([b"bytes are not text"])
    with pytest.raises(ValueError, match="engine"):
        MSAVectorStore.from_texts(["x"])


def test_store_namespaces_crud_search_and_persistence(model_dir, tmp_path):
    eng = MSAEngine.from_pretrained(model_dir, device="cpu")
    store = MSAStore(eng)
    store.put(("users", "ann"), "cat", {"text": "My cat is called Biscuit.", "kind": "pet", "n": 1})
    store.put(("users", "ann"), "city", {"text": "I live in Lisbon.", "kind": "place", "n": 2})
    store.put(("users", "bob"), "cat", {"text": "Bob has no cat.", "kind": "pet", "n": 3})
    store.put(("docs",), "readme", {"title": "no text field"})
    assert store.get(("users", "ann"), "cat").value["text"] == "My cat is called Biscuit."
    assert store.get(("users", "ann"), "nope") is None
    hits = store.search(("users", "ann"), query="What is my cat called?", limit=5)
    assert {h.key for h in hits} == {"cat", "city"} and all(tuple(h.namespace) == ("users", "ann") for h in hits)
    assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    assert {tuple(h.namespace) for h in store.search(("users",), query="cat?", limit=10)} == {("users", "ann"),
                                                                                                ("users", "bob")}
    assert [h.key for h in store.search(("users",), filter={"kind": "pet", "n": {"$gt": 1}})] == ["cat"]
    assert tuple(store.search(("users",), filter={"kind": "pet", "n": {"$gt": 1}})[0].namespace) == ("users", "bob")
    assert store.list_namespaces() == [("docs",), ("users", "ann"), ("users", "bob")]
    assert store.list_namespaces(prefix=("users",), max_depth=1) == [("users",)]
    assert store.list_namespaces(suffix=("bob",)) == [("users", "bob")]
    store.put(("users", "ann"), "cat", {"text": "My cat is called Pepper now.", "kind": "pet", "n": 1})
    item = store.get(("users", "ann"), "cat")
    assert item.value["text"].endswith("Pepper now.") and item.updated_at >= item.created_at
    assert len(eng) == 4  # overwrite, not duplicate
    store.delete(("users", "bob"), "cat")
    assert store.get(("users", "bob"), "cat") is None and len(eng) == 3
    eng.save(str(tmp_path / "mem"))
    eng2 = MSAEngine.from_pretrained(model_dir, device="cpu", memory=str(tmp_path / "mem"))
    assert MSAStore(eng2).get(("users", "ann"), "cat").value == item.value

    async def run():
        await store.aput(("users", "cy"), "k", {"text": "async put"})
        return await store.aget(("users", "cy"), "k"), await store.asearch(("users", "cy"), query="put?")
    got, found = asyncio.run(run())
    assert got.value == {"text": "async put"} and [h.key for h in found] == ["k"]
    with pytest.raises(TypeError, match="dicts"):
        store.put(("users",), "bad", "not a dict")
    with pytest.raises(TypeError, match="must be a str"):
        store.search(("users",), query=5)
    with pytest.raises(ValueError):
        store.put(("users",), "", {"text": "x"})


def test_store_in_create_agent_and_graph_node(model_dir):
    from langchain.agents import create_agent
    from langchain.agents.middleware import before_model
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.runtime import Runtime

    eng = MSAEngine.from_pretrained(model_dir, device="cpu", k=1)
    store = MSAStore(eng)
    store.put(("memories", "u1"), "cat", {"text": "My cat is called Biscuit."})
    store.put(("memories", "u2"), "dog", {"text": "My dog is called Rex."})
    seen = []

    @before_model
    def recall(state, runtime: Runtime):
        q = state["messages"][-1].content
        seen.extend(runtime.store.search(("memories", "u1"), query=q, limit=3))
        return None

    agent = create_agent(ChatMSA(engine=eng, max_tokens=3), tools=[], store=store, middleware=[recall])
    out = agent.invoke({"messages": [{"role": "user", "content": "What is my cat called?"}]})
    assert isinstance(out["messages"][-1], AIMessage) and out["messages"][-1].usage_metadata["output_tokens"] >= 1
    assert [h.key for h in seen] == ["cat"]

    def remember(state: MessagesState, runtime: Runtime):
        text = state["messages"][-1].content
        runtime.store.put(("memories", "u3"), "last", {"text": text})
        return {}

    graph = StateGraph(MessagesState).add_node("remember", remember).add_edge(START, "remember") \
        .add_edge("remember", END).compile(store=store)
    graph.invoke({"messages": [{"role": "user", "content": "I like green tea."}]})
    assert store.get(("memories", "u3"), "last").value == {"text": "I like green tea."}


def test_vector_store_long_text_is_one_document_by_id(tiny_model_dir):
    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", max_doc_tokens=16)
    store = MSAVectorStore(engine=engine)
    long_text = " ".join(["Paris is the capital of France."] * 6)
    with pytest.warns(UserWarning, match="parent_id"):
        ids = store.add_texts([long_text, "Berlin is in Germany."], metadatas=[{"src": "a"}, {"src": "b"}],
                              ids=["long", "short"])
    assert ids == ["long", "short"]
    (doc,) = store.get_by_ids(["long"])
    assert doc.id == "long" and doc.metadata == {"src": "a"}
    assert doc.page_content.split() == long_text.split()
    # every search sees documents, not parts: k distinct ones, the long one whole under its id, with the caller's
    # metadata (as InMemoryVectorStore, which holds one vector per document)
    store.add_texts(["Rome is in Italy.", "Madrid is in Spain."], ids=["rome", "madrid"])
    searches = {"similarity": store.similarity_search("capital of France", k=3),
                "mmr": store.max_marginal_relevance_search("capital of France", k=3, fetch_k=3),
                "retriever": store.as_retriever(search_kwargs={"k": 3}).invoke("capital of France"),
                "rounds": MSARetriever(engine=engine, k=3, rounds=2).invoke("capital of France")}
    for name, docs in searches.items():
        assert len({d.id for d in docs}) == 3 and all("#" not in d.id for d in docs), name
        for d in docs:
            if d.id == "long":
                assert d.page_content == long_text and d.metadata.get("src") == "a" and "part" not in d.metadata
    # a filter sees the document as the caller added it: all its parts are admitted or left out together
    assert [d.id for d in store.similarity_search("France", k=3, filter=lambda d: d.id == "long")] == ["long"]
    assert [d.id for d in store.similarity_search("France", k=3, filter={"src": "a"})] == ["long"]
    assert store.similarity_search("France", k=3, filter={"part": 0}) == []
    # a part id is no document: neither fetched nor deleted (deleting it cut a piece out of the text)
    assert store.get_by_ids(["long#1"]) == []
    store.delete(["long#1"])
    assert store.get_by_ids(["long"])[0].page_content == long_text
    store.delete(["long"])
    assert store.get_by_ids(["long"]) == [] and len(engine) == 3


def test_store_search_counts_an_item_stored_in_parts_once(tiny_model_dir):
    """LangGraph's InMemoryStore ranks items, not vectors: offset and limit count items, and an unindexed item
    fills a page only after every indexed one."""
    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", max_doc_tokens=16)
    store = MSAStore(engine)
    with pytest.warns(UserWarning, match="parent_id"):
        store.put(("m",), "long", {"text": " ".join(["Paris is the capital of France."] * 30)})  # ~20 parts
    store.put(("m",), "k0", {"text": "Berlin is in Germany."})
    store.put(("m",), "k1", {"text": "Rome is in Italy."})
    store.put(("m",), "unindexed", {"text": "Madrid is in Spain."}, index=False)
    q = "Paris is the capital of France. Paris is the capital of France."  # the long item's parts rank high
    page = store.search(("m",), query=q, limit=3)
    assert sorted(i.key for i in page) == ["k0", "k1", "long"] and all(i.score is not None for i in page)
    first, rest = (store.search(("m",), query=q, limit=n, offset=o) for n, o in ((1, 0), (3, 1)))
    assert [i.key for i in first + rest] == [i.key for i in page] + ["unindexed"]


def test_public_names_and_langgraph_is_optional():
    import subprocess
    import sys

    import msa_plugins.integrations.langchain as lc
    assert sorted(lc.__all__) == sorted(["ChatMSA", "MSARetriever", "MSAVectorStore", "MSAStore",
                                         "filter_to_allow_ids", "filter_to_predicate", "__version__"])
    assert all(getattr(lc, name) is not None for name in lc.__all__)
    # ChatMSA and the retrievers must import where langgraph cannot; MSAStore then says what to install
    code = ("import sys; sys.modules['langgraph'] = None\n"
            "from msa_plugins.integrations.langchain import ChatMSA, MSARetriever, MSAVectorStore\n"
            "try:\n    from msa_plugins.integrations.langchain import MSAStore\n"
            "except ModuleNotFoundError as e:\n    print('store:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "MSAStore needs langgraph" in p.stdout and "msa-plugins[langchain]" in p.stdout


def test_filter_language_and_error_types(model_dir):
    from msa_plugins import MemoryDocument
    from msa_plugins.integrations.langchain import filter_to_predicate

    dated = MemoryDocument("d", "some text", {"topic": "geo", "year": 2001}, 3)
    undated = MemoryDocument("u", "some text", {"topic": "geo"}, 3)
    either = filter_to_predicate({"$or": [{"year": {"$lt": 2000}}, {"topic": {"$in": ["geo"]}}]})
    assert either(dated) and either(undated)
    before = filter_to_predicate({"$and": [{"topic": "geo"}, {"year": {"$lt": 2002}}]})
    assert before(dated) and not before(undated)  # a missing field satisfies only $ne / $nin
    assert filter_to_predicate({"year": {"$ne": 1990}})(undated)
    assert filter_to_predicate(lambda d: d.id == "d" and d.page_content == "some text")(dated)
    assert filter_to_predicate(None) is None

    # mistakes are refused before routing, even on an empty memory: wrong type -> TypeError, wrong value -> ValueError
    eng = MSAEngine.from_pretrained(model_dir, device="cpu")
    store, retriever = MSAVectorStore(eng), MSARetriever(engine=eng)
    for bad in (["topic"], {3: "x"}, {"$or": {"a": 1}}, {"t": {"$in": "ab"}}):
        with pytest.raises(InvalidTypeError):
            store.similarity_search("q?", filter=bad)
    for bad in ({"t": {"$near": 1}}, {"$xor": [{"t": 1}]}):
        with pytest.raises(InvalidArgumentError):
            retriever.invoke("q?", filter=bad)
    with pytest.raises(InvalidArgumentError):
        store.similarity_search("q?", k=0)
    assert store.similarity_search("q?", filter={"t": 1}) == [] and retriever.invoke("q?") == []


def test_chat_on_empty_memory_answers_from_the_model_alone(model_dir):
    eng = MSAEngine.from_pretrained(model_dir, device="cpu")
    msg = ChatMSA(engine=eng, max_tokens=3).invoke("Hello?")
    assert msg.response_metadata["documents"] == [] and msg.usage_metadata["output_tokens"] >= 1


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


def test_tools_go_through_a_chat_template_that_renders_them(tools_model_dir):
    from langchain_core.exceptions import OutputParserException
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from transformers import AutoTokenizer

    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    engine = MSAEngine.from_pretrained(tools_model_dir, device="cpu", k=2)
    assert engine.supports_tools
    msg = ChatMSA(engine=engine, max_tokens=3, format_retries=0).bind_tools([get_weather]).invoke("Weather in Rome?")
    assert msg.response_metadata["tool_format"] == "chat_template" and msg.response_metadata["attempts"] == 1
    # the prompt is the template's rendering of the question with the schemas (no JSON protocol in a system turn)
    tok = AutoTokenizer.from_pretrained(tools_model_dir)
    question = [{"role": "user", "content": "Weather in Rome?"}]
    expected = tok.apply_chat_template(question, tools=[convert_to_openai_tool(get_weather)], tokenize=False,
                                       add_generation_prompt=True)
    assert "get_weather" in expected and "You can call these tools" not in expected
    assert msg.usage_metadata["input_tokens"] == len(tok(expected, add_special_tokens=False)["input_ids"])
    assert msg.usage_metadata["input_tokens"] > engine.generate(question, max_new_tokens=1).prompt_tokens
    # a required call the random model cannot make: bounded retries, then a clear error
    with pytest.raises(OutputParserException, match="after 2 attempts.*tool-call format"):
        ChatMSA(engine=engine, max_tokens=3, format_retries=1).bind_tools(
            [get_weather], tool_choice="any").invoke("Weather in Rome?")


def test_every_valid_tool_call_of_a_reply_is_returned(engine, monkeypatch):
    """A reply with two <tool_call> blocks gave only the first call (the second was dropped in silence); ChatOpenAI
    returns every call the model makes unless parallel_tool_calls=False. Now so does ChatMSA. The replies are
    scripted (what the model wrote is not under test: the random model cannot call tools); ChatMSA's parsing,
    validation and message building are the real ones."""
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from msa_plugins import GenerationResult, Stream
    from msa_plugins.integrations.langchain.tools import parse_tool_calls

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def mul(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    tools = [convert_to_openai_tool(add), convert_to_openai_tool(mul)]
    two = ('<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
           '<tool_call>\n{"name": "mul", "arguments": {"a": 4, "b": 5}}\n</tool_call>')
    calls, errors = parse_tool_calls(two, tools, None)
    assert [(c["name"], c["args"]) for c in calls] == [("add", {"a": 2, "b": 3}), ("mul", {"a": 4, "b": 5})]
    assert errors == []
    # a JSON list holds one call per item; an argument object is never read again as a call of its own (here, as
    # bare arguments for a forced tool it would be one)
    listed = '[{"name": "add", "arguments": {"a": 1, "b": 1}}, {"name": "add", "arguments": {"a": 2, "b": 2}}]'
    assert [c["args"] for c in parse_tool_calls(listed, tools, "add")[0]] == [{"a": 1, "b": 1}, {"a": 2, "b": 2}]
    # a valid call beside an invalid one: the valid one is taken, the other's problem reported
    calls, errors = parse_tool_calls('{"name": "add", "arguments": {"a": 1}} {"name": "mul", "arguments": '
                                     '{"a": 1, "b": 2}}', tools, None)
    assert [c["name"] for c in calls] == ["mul"] and "required field 'b'" in errors[0]

    def scripted_reply(turns, options=None, *, tools=None):  # what the model writes, fixed
        return Stream([], iter([two]), lambda t: GenerationResult(t, 10, 5, {"total_s": 0.0}))

    monkeypatch.setattr(engine, "stream_generate", scripted_reply)
    chat = ChatMSA(engine=engine, use_memory=False)
    msg = chat.bind_tools([add, mul]).invoke("2 + 3, and 4 * 5?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("add", {"a": 2, "b": 3}), ("mul", {"a": 4, "b": 5})]
    assert len({c["id"] for c in msg.tool_calls}) == 2 and msg.content == ""
    one = chat.bind_tools([add, mul], parallel_tool_calls=False).invoke("2 + 3, and 4 * 5?")
    assert [c["name"] for c in one.tool_calls] == ["add"]


def test_template_tool_calls_are_parsed_and_history_uses_the_template_format():
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from msa_plugins.integrations.langchain.chat_models import _split_messages
    from msa_plugins.integrations.langchain.tools import looks_like_call, parse_tool_call

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    tools = [convert_to_openai_tool(add)]
    reply = 'Let me add {these}.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    call = parse_tool_call(reply, tools, None)
    assert call["name"] == "add" and call["args"] == {"a": 2, "b": 3}
    cut = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}'  # the token limit hit before the end tag
    assert parse_tool_call(cut, tools, None)["args"] == {"a": 2, "b": 3}
    assert "required field 'b'" in parse_tool_call('<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>',
                                                   tools, None)
    assert looks_like_call("<tool_call>\n{") and not looks_like_call("Five.")
    turns = [HumanMessage("What is 2 plus 3?"),
             AIMessage("", tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}]),
             ToolMessage("5", tool_call_id="c1", name="add")]
    question, history, _, _ = _split_messages(turns, template_tools=True)
    assert question == "<tool_response>\n5\n</tool_response>"
    assert history[-1] == {"role": "assistant",
                           "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'}
    question, history, _, _ = _split_messages(turns)  # the JSON protocol's form
    assert question == "Tool result (add): 5" and history[-1]["content"] == '{"name": "add", "arguments": {"a": 2, "b": 3}}'


# ------------------------------------------------------------------ drop-in fidelity against the references
def test_store_filters_and_listing_order_match_langgraphs_in_memory_store(model_dir):
    """Filters match nested values by containment, operators compare as numbers, and a listing without a query
    comes in put order (an overwrite keeps its place), as InMemoryStore does; side by side on the same puts."""
    from langgraph.store.memory import InMemoryStore

    ref, ours = InMemoryStore(), MSAStore(MSAEngine.from_pretrained(model_dir, device="cpu"))
    puts = [(("u", "ann"), "a", {"text": "alpha", "meta": {"lang": "en", "score": 5}, "n": "5"}),
            (("u", "bob"), "b", {"text": "beta", "meta": {"lang": "en", "score": 1}, "n": "1"}),
            (("u", "ann"), "c", {"text": "gamma", "meta": {"lang": "pt", "score": 2}, "n": "2", "tags": ["x", "y"]}),
            (("u", "ann"), "a", {"text": "alpha again", "meta": {"lang": "en", "score": 5}, "n": "5"})]
    for ns, key, value in puts:
        ref.put(ns, key, value)
        ours.put(ns, key, value)
    for flt in ({"meta": {"lang": "en"}}, {"meta": {"score": {"$gt": 3}}}, {"n": {"$gt": 3}}, {"tags": ["x", "y"]},
                {"meta": {"lang": {"$ne": "en"}}}, {"meta": {"missing": 1}}, None):
        assert [(i.namespace, i.key) for i in ours.search(("u",), filter=flt)] == \
            [(i.namespace, i.key) for i in ref.search(("u",), filter=flt)], flt
    for offset, limit in ((0, 10), (1, 1), (2, 5)):
        assert [i.key for i in ours.search(("u",), offset=offset, limit=limit)] == \
            [i.key for i in ref.search(("u",), offset=offset, limit=limit)]
    with pytest.raises(InvalidArgumentError, match=r"\$in"):  # the VectorStore filter language is not the store's
        ours.search(("u",), filter={"n": {"$in": ["1"]}})
    with pytest.raises(InvalidArgumentError, match=r"\$or"):
        ours.search(("u",), filter={"$or": [{"n": "1"}]})
    with pytest.raises(InvalidTypeError, match="compares numbers"):
        ours.search(("u",), filter={"text": {"$gt": 1}})
    # where InMemoryStore raises TypeError (an item lacking the field), an ordering operator admits no such item
    ours.put(("u", "cy"), "d", {"text": "delta"})
    assert [i.key for i in ours.search(("u",), filter={"n": {"$gte": 2}})] == ["a", "c"]


def test_vector_store_knobs_match_in_memory_vector_store(engine):
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    ref, ours = InMemoryVectorStore(DeterministicFakeEmbedding(size=8)), MSAVectorStore(engine=engine)
    docs = [Document("Rome is in Italy.", id="doc-1"), Document("Oslo is in Norway.")]
    for store in (ref, ours):
        ids = store.add_documents(docs, ids=None)  # ids=None keeps each Document's own id
        assert ids[0] == "doc-1" and [d.id for d in store.get_by_ids(["doc-1"])] == ["doc-1"]
        assert len(store.max_marginal_relevance_search("Where is Rome?", k=3, fetch_k=2)) == 2  # at most fetch_k
    assert asyncio.run(ours.aadd_documents([Document("Bern is in Switzerland.", id="doc-3")], ids=None)) == ["doc-3"]
    assert [d.id for d in ours.get_by_ids(["doc-3"])] == ["doc-3"]
    # a per-call filter=None clears the retriever's filter, as VectorStoreRetriever does
    retriever = MSARetriever(engine=engine, k=4, filter={"topic": "geo"})
    assert [d.id for d in retriever.invoke("capital?")] == ["f0"]
    assert len(retriever.invoke("capital?", filter=None)) == 4
    assert len(ours.as_retriever(search_kwargs={"k": 4, "filter": {"topic": "geo"}}).invoke("capital?",
                                                                                           filter=None)) == 4


def test_chat_token_ids_and_tool_knobs_without_tools(engine):
    chat = ChatMSA(engine=engine)
    text = "Where was Alice born?"
    assert chat.get_token_ids(text) == engine.token_ids(text) and chat.get_num_tokens(text) == engine.count_tokens(text)
    custom = ChatMSA(engine=engine, custom_get_token_ids=lambda t: list(range(len(t))))
    assert custom.get_num_tokens(text) == len(text)  # LangChain's base class counts with it too
    for knob in ({"tool_choice": "any"}, {"tool_choice": "add"}, {"parallel_tool_calls": False}):
        with pytest.raises(InvalidArgumentError, match="needs bound tools"):
            chat.invoke(text, **knob)
    assert chat.invoke(text, tool_choice="auto", max_tokens=2).content is not None  # auto asks for nothing
