"""`msa serve` for real: the server runs on 127.0.0.1 (a free port, a thread) over a tiny random model, and
the official `openai` client, LangChain `ChatOpenAI` and LlamaIndex `OpenAILike` talk to it."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from msa_plugins import MSAEngine
from msa_plugins.server import ServerSettings, ServerThread, create_app, sibling_engine

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog.", "Berlin is the capital of Germany."]
QUESTIONS = ["Where was Alice born?", "What is the capital of France?", "What does the fox do?",
             "Where is Berlin?"]
KEYS = {"key-all": "*", "key-docs": {"docs"}, "key-private": {"private"}}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=2,
                                       max_new_tokens=MAX_TOKENS)
    engine.add(DOCS, ids=[f"d{i}" for i in range(len(DOCS))], progress=False)
    private = sibling_engine(engine)
    private.add(["The secret code is 1234."], ids=["secret"], progress=False)
    # answers alone, before the server (and its batch scheduler) exists: the reference of batched ones
    alone = {q: engine.query(q) for q in QUESTIONS}
    # a prompt the random model answers at length (no stop token in 300 tokens): it can hold a slot
    long_q = next(q for q in ["fox fox fox", "0123456789", "Memory sparse attention", "Paris Berlin"]
                  if engine.generate([{"role": "user", "content": q}], max_new_tokens=300).finish_reason == "length")
    app = create_app({"docs": engine, "private": private},
                     ServerSettings(max_batch=4, max_queue=2, max_tokens=400, max_body_bytes=64_000, api_keys=KEYS))
    with ServerThread(app) as server:
        yield {"url": server.url, "engine": engine, "alone": alone, "long_q": long_q}


def client(served, key="key-all"):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=key, timeout=60, max_retries=0)


def test_chat_answers_with_sources_and_usage_as_the_engine_does_alone(served):
    c = client(served)
    q = QUESTIONS[0]
    r = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": q}], max_tokens=MAX_TOKENS,
                                  temperature=0)
    ref = served["alone"][q]
    assert r.choices[0].message.content == ref.answer
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.completion_tokens)
    sources = r.model_extra["sources"]
    assert [s["id"] for s in sources] == [d.id for d in ref.documents]
    assert sources[0]["text"] in DOCS and isinstance(sources[0]["score"], float)
    # MSA's multi-hop options as extra body fields: 3 documents in all, over 2 rounds, as the engine routes them
    hops = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": q}], max_tokens=1,
                                     extra_body={"k": 3, "rounds": 2, "k_per_round": False})
    assert [(s["id"], s["round"]) for s in hops.model_extra["sources"]] == \
        [(d.id, d.round) for d in served["engine"].retrieve(q, k=3, rounds=2)]
    reranked = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": q}], max_tokens=1,
                                         extra_body={"k": 2, "rerank": 4})
    assert [s["id"] for s in reranked.model_extra["sources"]] == [d.id for d in served["engine"].retrieve(q, k=2, rerank=4)]


def test_streaming_sends_sources_first_then_tokens_then_usage(served):
    c = client(served)
    q = QUESTIONS[1]
    chunks = list(c.chat.completions.create(model="docs", messages=[{"role": "user", "content": q}], stream=True,
                                            max_tokens=MAX_TOKENS, stream_options={"include_usage": True}))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert [s["id"] for s in first.model_extra["sources"]] == [d.id for d in served["alone"][q].documents]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() == served["alone"][q].answer
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == served["alone"][q].completion_tokens


def test_concurrent_requests_are_batched_and_equal_their_answers_alone(served):
    c = client(served)
    out = {}

    def ask(q):
        out[q] = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": q}],
                                           max_tokens=MAX_TOKENS).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert out == {q: served["alone"][q].answer for q in QUESTIONS}


def test_langchain_chat_openai(served):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=served["url"] + "/v1", api_key="key-all", model="docs",
                                      temperature=0, max_tokens=MAX_TOKENS, max_retries=0)
    q = QUESTIONS[2]
    assert llm.invoke(q).content == served["alone"][q].answer
    assert "".join(chunk.content for chunk in llm.stream(q)).strip() == served["alone"][q].answer


def test_llama_index_openai_like(served):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(model="docs", api_base=served["url"] + "/v1", api_key="key-all", is_chat_model=True,
                                 temperature=0, max_tokens=MAX_TOKENS, context_window=2048, max_retries=0)
    q = QUESTIONS[3]
    assert llm.chat([ChatMessage(role="user", content=q)]).message.content == served["alone"][q].answer


def test_memory_add_search_get_delete_then_query(served):
    url, h = served["url"], {"Authorization": "Bearer key-all"}
    with httpx.Client(base_url=url, headers=h, timeout=60) as http:
        r = http.post("/v1/memories/docs/documents", json={"collection": "news", "documents": [
            {"id": "zebra", "text": "Zebras have black and white stripes.", "metadata": {"lang": "en"}}]})
        assert r.status_code == 200 and r.json()["ids"] == ["zebra"]
        doc = http.get("/v1/memories/docs/documents/zebra").json()
        assert doc["collection"] == "news" and doc["parts"][0]["metadata"] == {"lang": "en"}
        hits = http.post("/v1/memories/docs/search", json={"query": "stripes", "collection": "news"}).json()["data"]
        assert [d["id"] for d in hits] == ["zebra"]  # the collection admits only it
        # multi-hop search: what engine.retrieve(rounds=) routes, rounds in each hit; an unknown field is refused
        q = QUESTIONS[0]
        hops = http.post("/v1/memories/docs/search", json={"query": q, "k": 3, "rounds": 2}).json()["data"]
        assert [(d["id"], d["round"]) for d in hops] == \
            [(d.id, d.round) for d in served["engine"].retrieve(q, k=3, rounds=2)]
        r = http.post("/v1/memories/docs/search", json={"query": q, "top_k": 3})
        assert r.status_code == 422 and "top_k" in r.text
        assert http.post("/v1/memories/docs/search", json={"query": q, "rounds": 9}).status_code == 422
        reranked = http.post("/v1/memories/docs/search", json={"query": q, "k": 2, "rerank": 4}).json()["data"]
        assert [(d["id"], d["score"]) for d in reranked] == \
            [(d.id, pytest.approx(d.score, abs=1e-5)) for d in served["engine"].retrieve(q, k=2, rerank=4)]
        assert http.post("/v1/memories/docs/search", json={"query": q, "rerank": -1}).status_code == 422
        listed = http.get("/v1/memories/docs/documents", params={"collection": "news"}).json()
        assert listed["total"] == 1
        c = client(served)
        r = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": "stripes?"}],
                                      max_tokens=2, extra_body={"collection": "news", "k": 1})
        assert [s["id"] for s in r.model_extra["sources"]] == ["zebra"]
        assert http.post("/v1/memories/docs/documents", json={"documents": [
            {"id": "zebra", "text": "again"}]}).status_code == 409
        assert http.delete("/v1/memories/docs/documents/zebra").json()["deleted"] == ["zebra"]
        r = http.get("/v1/memories/docs/documents/zebra")
        assert r.status_code == 404 and "zebra" in r.json()["error"]["message"]
        r = c.chat.completions.create(model="docs", messages=[{"role": "user", "content": "stripes?"}],
                                      max_tokens=2, extra_body={"collection": "news"})
        assert r.model_extra["sources"] == []  # nothing left in the collection: the model alone


def test_a_second_memory_is_isolated_by_key(served):
    url = served["url"]
    private = client(served, "key-private")
    assert [m.id for m in private.models.list()] == ["private"]
    r = private.chat.completions.create(model="private", messages=[{"role": "user", "content": "the code?"}],
                                        max_tokens=2)
    assert [s["id"] for s in r.model_extra["sources"]] == ["secret"]
    with pytest.raises(openai.PermissionDeniedError) as e:
        private.chat.completions.create(model="docs", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.status_code == 403 and e.value.body["code"] == "memory_not_allowed"
    docs_only = client(served, "key-docs")
    with pytest.raises(openai.PermissionDeniedError):
        docs_only.chat.completions.create(model="private", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    r = httpx.get(url + "/v1/memories/private/documents", headers={"Authorization": "Bearer key-docs"})
    assert r.status_code == 403
    with pytest.raises(openai.AuthenticationError):
        client(served, "wrong").models.list()
    hits = httpx.post(url + "/v1/memories/docs/search", json={"query": "code"},
                      headers={"Authorization": "Bearer key-docs"}).json()["data"]
    assert "secret" not in [d["id"] for d in hits]


def test_limits_give_openai_errors(served):
    url, h = served["url"], {"Authorization": "Bearer key-all"}
    big = {"model": "docs", "messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(url + "/v1/chat/completions", json=big, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    c = client(served)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        c.chat.completions.create(model="docs", messages=[{"role": "user", "content": "hi"}], max_tokens=401)
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="docs", messages=[{"role": "user", "content": "hi"}], extra_body={"k": 0})
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_full_server_says_429_and_a_disconnected_client_frees_its_slot(tiny_model_dir, served):
    # its own model object: a model has one batch scheduler, and the module's server holds that one
    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    app = create_app({"docs": engine}, ServerSettings(max_batch=1, max_queue=0, max_tokens=300))
    body = {"model": "docs", "messages": [{"role": "user", "content": served["long_q"]}], "max_tokens": 300,
            "stream": True, "use_memory": False}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as held:
            lines = held.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the slot is taken
            r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
        # the client went away mid-answer: its slot frees and the next request is served
        for _ in range(100):
            r = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            if r.status_code != 429:
                break
            threading.Event().wait(0.1)
        assert r.status_code == 200, r.text
        health = http.get("/health").json()
        assert health["batch"]["in_flight"] == 0 and health["batch"]["live"] == 0


def test_health_and_metrics(served):
    c = client(served)
    c.chat.completions.create(model="docs", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    health = httpx.get(served["url"] + "/health").json()
    assert health["status"] == "ok" and health["memories"]["private"] == 1
    text = httpx.get(served["url"] + "/metrics").text
    assert 'msa_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    for series in ("msa_time_to_first_token_seconds_bucket", "msa_routing_seconds_count", "msa_prefill_seconds_sum",
                   "msa_decode_seconds_count", "msa_completion_tokens_total", "msa_queue_depth",
                   "msa_active_sequences"):
        assert series in text, series


def test_plain_chat_without_memory_and_history(served):
    c = client(served)
    r = c.chat.completions.create(model="docs", max_tokens=4, extra_body={"use_memory": False}, messages=[
        {"role": "system", "content": "Be short."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Where is Paris?"}])
    assert r.model_extra["sources"] == [] and r.usage.completion_tokens <= 4
    json.dumps(r.model_dump())
    # a memory option on a plain chat would be dropped: refused, naming it
    with pytest.raises(openai.UnprocessableEntityError, match="k applies to answers from memory"):
        c.chat.completions.create(model="docs", max_tokens=4, extra_body={"use_memory": False, "k": 2},
                                  messages=[{"role": "user", "content": "Where is Paris?"}])


def test_a_failed_save_leaves_the_served_memory_as_it_was(tiny_model_dir, tmp_path, monkeypatch):
    """The server saves each change to the memory's folder; when that save fails (a full disk), the request
    fails AND the live memory is unchanged: a retry is not refused as a duplicate, and a restart from the
    folder serves what clients were told was stored."""
    import asyncio

    from msa_plugins.engine import storage
    from msa_plugins.server import Memory

    engine = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    engine.add(DOCS, ids=[f"d{i}" for i in range(len(DOCS))], progress=False)
    folder = str(tmp_path / "docs")
    engine.save(folder)
    app = create_app({"docs": Memory("docs", engine, folder)})
    body = {"documents": [{"id": "bob", "text": "Bob lives in Oslo."}]}
    real_save = storage.save

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            monkeypatch.setattr(storage, "save", disk_full)
            failed = [(await http.post("/v1/memories/docs/documents", json=body)).status_code,
                      (await http.delete("/v1/memories/docs/documents/d0")).status_code]
            live = engine.snapshot().ids
            monkeypatch.setattr(storage, "save", real_save)
            retry = await http.post("/v1/memories/docs/documents", json=body)
            return failed, live, retry.status_code

    failed, live, retry = asyncio.run(run())
    assert all(code >= 500 for code in failed)
    assert live == [f"d{i}" for i in range(len(DOCS))]  # neither the add nor the delete was kept
    assert retry == 200
    restarted = sibling_engine(engine)
    restarted.load(folder)
    assert restarted.snapshot().ids == engine.snapshot().ids == [f"d{i}" for i in range(len(DOCS))] + ["bob"]


def test_bad_requests_get_4xx_naming_the_field_and_hold_no_slot(served):
    """Each of these used to be a 500, a silent acceptance, or (a bad stream_options) a request slot never given
    back, so that a few of them locked the server out."""
    url, h = served["url"], {"Authorization": "Bearer key-all"}
    msg = [{"role": "user", "content": "Where was Alice born?"}]

    def chat(**body):
        return httpx.post(url + "/v1/chat/completions", json={"model": "docs", "messages": msg, "max_tokens": 2, **body},
                          headers=h, timeout=60)

    for body, param in [({"stream": True, "stream_options": "x"}, "stream_options"),
                        ({"stream": True, "stream_options": ["include_usage"]}, "stream_options"),
                        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
                        ({"stream": "false"}, "stream"), ({"use_memory": "false"}, "use_memory"),
                        ({"colection": "news"}, "colection"), ({"top_k": 3}, "top_k"),
                        ({"top_p": 0.5}, "top_p"), ({"presence_penalty": 1}, "presence_penalty"),
                        ({"logit_bias": {"5": 10}}, "logit_bias"), ({"model": ["docs"]}, "model"),
                        ({"memory": {"x": 1}}, "memory"), ({"ids": [["d0"]]}, "ids"),
                        ({"filters": {"lang": {"$eq": "en"}}}, "filters"), ({"seed": 2 ** 70}, "seed")]:
        r = chat(**body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.status_code, r.text)
    r = chat(user="u1", metadata={"app": "x"}, store=False, top_p=1, n=1)  # bookkeeping, neutral values: fine
    assert r.status_code == 200
    for messages in ([{"role": "system", "content": "Be \ud800 brief."}] + msg, [{"role": "user", "content": "\ud800?"}]):
        r = httpx.post(url + "/v1/chat/completions", content=json.dumps({"model": "docs", "messages": messages}),
                       headers={**h, "content-type": "application/json"})
        assert r.status_code == 422 and "lone surrogate" in r.json()["error"]["message"]
    deep = b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    r = httpx.post(url + "/v1/chat/completions", content=deep, headers={**h, "content-type": "application/json"})
    assert r.status_code in (400, 413) and "error" in r.json()
    add = url + "/v1/memories/docs/documents"
    for body, param in [({"documents": [{"id": "z", "text": "Zed."}], "upsert": "false"}, "upsert"),
                        ({"documents": [{"id": "z", "text": "Zed."}], "colection": "news"}, "colection"),
                        ({"documents": [{"id": "z", "txt": "Zed."}]}, "txt")]:
        r = httpx.post(add, json=body, headers=h)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(url + "/v1/memories/docs/documents/delete", json={"ids": ["zz"], "missing_ok": "false"}, headers=h)
    assert r.status_code == 422 and r.json()["error"]["param"] == "missing_ok"
    assert "z" not in served["engine"]
    assert httpx.get(url + "/health").json()["batch"]["in_flight"] == 0  # every refused request let its slot go


def test_the_server_keeps_what_another_writer_saved_to_its_folder(tiny_model_dir, tmp_path):
    """`msa ingest` into a folder the server serves used to be overwritten by the server's next write (its copy in
    memory was older); two names on one folder would each save their own copy over the other's."""
    from msa_plugins.server import open_memories

    folder = str(tmp_path / "mem")
    with pytest.raises(ValueError, match="same folder"):
        open_memories([f"a={folder}", f"b={tmp_path}/../{tmp_path.name}/mem"], model=tiny_model_dir("llama"),
                      device="cpu")
    memories = open_memories([folder], model=tiny_model_dir("llama"), device="cpu")
    with ServerThread(create_app(memories)) as server:
        add = server.url + "/v1/memories/mem/documents"
        assert httpx.post(add, json={"documents": [{"id": "a", "text": "Alpha."}]}).status_code == 200
        other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")  # e.g. msa ingest, meanwhile
        other.load(folder)
        other.add(["Carla paints in Porto."], ids=["carla"], progress=False)
        other.save(folder)
        assert httpx.post(add, json={"documents": [{"id": "b", "text": "Beta."}]}).status_code == 200
    restarted = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    restarted.load(folder)
    assert restarted.snapshot().ids == ["a", "carla", "b"] == memories["mem"].engine.snapshot().ids
