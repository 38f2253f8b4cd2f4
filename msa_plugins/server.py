"""`msa serve`: an OpenAI-compatible HTTP server over one or more MSA memories, with batched decoding.

Any OpenAI client (the `openai` package, LangChain `ChatOpenAI(base_url=...)`, LlamaIndex `OpenAILike`,
curl) talks to it; each memory is a "model" (`GET /v1/models`), so `model="docs"` asks the memory `docs`.

    POST /v1/chat/completions     stream (SSE) or not; the routed documents come back as `sources`: a field
                                  of the response, and of the first SSE chunk (before any token).
                                  MSA options as extra body fields: k, mode, collection ("*": all),
                                  filters, ids, rounds, k_per_round, rerank, prompt_style, memory,
                                  use_memory (False: plain chat with the model; the memory options
                                  are then refused, 422)
    GET  /v1/models               one entry per memory the caller's key may use
    GET  /v1/memories             the memories, with sizes
    POST /v1/memories/{m}/documents           add ({"documents": [{"id", "text", "metadata"}], "collection",
                                              "upsert": true to replace existing ids})
    GET  /v1/memories/{m}/documents           list (?collection=&limit=&offset=; all collections by default)
    GET  /v1/memories/{m}/documents/{id}      one document (a split long one: its parts)
    DELETE /v1/memories/{m}/documents/{id}    delete one
    POST /v1/memories/{m}/documents/delete    delete by ids, or by filters / collection
    POST /v1/memories/{m}/search              route only: {"query", "k", "collection", "filters", "ids",
                                              "rounds", "k_per_round", "rerank"} (other fields: 422)
    GET  /health, GET /metrics (Prometheus text)

Collections are the engine's (a question routes within one, "default" unless named; "*" reads all);
filters match metadata fields (a value, or a list of admitted values). Writes go through the engine's snapshots: a question being answered keeps the view
it started with, and writes never wait for answers. With a memory folder, each write is saved to it.

A field the server does not know is refused (422, naming it), and so is an OpenAI option set to a value that
would change the answer and that it cannot honour (top_p != 1, penalties, logit_bias, audio, ...); OpenAI's
bookkeeping fields (user, metadata, store, ...) are accepted. Flags must be JSON booleans ("false" is refused).
When another writer (`msa ingest`, `msa adapt`) has saved to a served folder, the next write loads the folder
first, under its lock, so that work is kept; one folder cannot be served under two names.

Limits (all configurable) answer with OpenAI-shaped errors, never a 500 or a hang: body size (413),
prompt tokens and max_tokens (422), requests in flight beyond batch + queue (429 with Retry-After).
A client that disconnects ends its generation at the next decode step.

This module is above the engine (facade level): it uses the public `MSAEngine` API, and reaches the
model only to share it between memories and to attach the batch scheduler.
"""

import argparse
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Optional

from .config import MODES, PROMPT_STYLES, AnswerOptions
from .core import MSAEngine
from .errors import (DocumentNotFoundError, DuplicateIdError, EmptyMemoryError, InputTooLongError,
                     InvalidArgumentError, InvalidTypeError, MemoryLockedError, MSAError)
from .scheduler import batched
from .validation import check_int, check_stop, check_temperature

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class ServerSettings:
    """Bounds and access of one server. api_keys: key -> memory names it may use ("*": all); empty: no
    authentication (the default for a loopback server)."""
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: Optional[int] = None  # None: the model's window (minus max_tokens)
    max_tokens: int = 1024  # the largest max_tokens a request may ask
    default_max_tokens: Optional[int] = None  # None: the engine's answer default
    max_batch: int = 8  # sequences decoding together
    max_queue: int = 32  # requests waiting beyond the batch; more are refused with 429
    retry_after_s: int = 1
    api_keys: dict = field(default_factory=dict)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}


def _status_of(e: MSAError) -> tuple:
    """HTTP status and OpenAI error type/code of one of the engine's errors."""
    if isinstance(e, InputTooLongError):
        return 422, "invalid_request_error", "context_length_exceeded"
    if isinstance(e, DuplicateIdError):
        return 409, "invalid_request_error", "duplicate_id"
    if isinstance(e, (InvalidArgumentError, InvalidTypeError)):
        return 422, "invalid_request_error", None
    if isinstance(e, (DocumentNotFoundError, EmptyMemoryError)):
        return 404, "invalid_request_error", "not_found"
    if isinstance(e, MemoryLockedError):
        return 503, "server_error", "memory_locked"
    return 500, "server_error", None


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """A few Prometheus series, rendered as the text exposition format (no client library needed)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
    HELP = {
        "msa_requests_total": ("counter", "HTTP requests by endpoint and status"),
        "msa_prompt_tokens_total": ("counter", "prompt tokens of answered requests"),
        "msa_completion_tokens_total": ("counter", "tokens generated"),
        "msa_request_seconds": ("histogram", "request latency by endpoint (streams: until the last event)"),
        "msa_time_to_first_token_seconds": ("histogram", "from the request to its first token"),
        "msa_routing_seconds": ("histogram", "routing time of answers from memory"),
        "msa_prefill_seconds": ("histogram", "prompt prefill time"),
        "msa_decode_seconds": ("histogram", "decode time (first token to last)"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict = {}
        self.hists: dict = {}
        self.gauges: dict = {}  # name -> callable giving the current value

    @staticmethod
    def _key(name: str, labels: dict) -> tuple:
        return name, tuple(sorted(labels.items()))

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            k = self._key(name, labels)
            self.counters[k] = self.counters.get(k, 0.0) + value

    def observe(self, name: str, value: float, **labels) -> None:
        with self._lock:
            k = self._key(name, labels)
            counts, total, n = self.hists.get(k) or ([0] * len(self.BUCKETS), 0.0, 0)
            for i, bound in enumerate(self.BUCKETS):  # cumulative buckets, as Prometheus reads them
                if value <= bound:
                    counts[i] += 1
            self.hists[k] = (counts, total + value, n + 1)

    def render(self) -> str:
        def lab(labels, extra=()):
            items = list(labels) + list(extra)
            return "{" + ",".join(f'{k}="{v}"' for k, v in items) + "}" if items else ""

        lines = []
        with self._lock:
            names = sorted({k[0] for k in self.counters} | {k[0] for k in self.hists} | set(self.HELP))
            for name in names:
                kind, text = self.HELP.get(name, ("counter", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for (n, labels), v in sorted(self.counters.items()):
                    if n == name:
                        lines.append(f"{name}{lab(labels)} {v:g}")
                for (n, labels), (counts, s, c) in sorted(self.hists.items()):
                    if n == name:
                        for b, cnt in zip(self.BUCKETS, counts):
                            lines.append(f"{name}_bucket{lab(labels, [('le', f'{b:g}')])} {cnt}")
                        lines.append(f"{name}_bucket{lab(labels, [('le', '+Inf')])} {c}")
                        lines.append(f"{name}_sum{lab(labels)} {s:g}")
                        lines.append(f"{name}_count{lab(labels)} {c}")
            for name, (text, fn) in sorted(self.gauges.items()):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {fn():g}"]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- memories
class Memory:
    """One named memory of the server: its engine, its folder (saved after each write, when given) and a
    lock that serialises its writers (readers never take it)."""

    def __init__(self, name: str, engine: MSAEngine, directory: Optional[str] = None):
        self.name, self.engine, self.directory = name, engine, directory
        self.write_lock = threading.Lock()

    def write(self, fn):
        """Run the change `fn` and save the memory: both, or (when either fails) neither."""
        with self.write_lock:
            if not self.directory:
                return fn()
            # another writer (msa ingest, msa adapt) may have saved to the folder: its work is loaded, not overwritten
            with self.engine.saving_to(self.directory, reload_if_changed=True):
                return fn()


_SAME = object()


def sibling_engine(engine: MSAEngine, config=None, router=_SAME) -> MSAEngine:
    """Another memory on the same model, router and settings (weights are shared, not copied). `config`:
    these settings instead of the engine's (which a loaded memory may have changed: its routing chunk size);
    `router`: this router instead of the engine's (None: training-free routing)."""
    if router is _SAME:
        router = engine.router if engine.has_trained_router else None
    return MSAEngine(engine.model, router=router, config=config or engine.config, name=engine.name)


def open_memories(specs: list, model: Optional[str] = None, router: Optional[str] = None,
                  device: Optional[str] = None, **overrides) -> dict:
    """name -> Memory for specs "DIR" or "NAME=DIR" (a folder that holds no memory yet starts empty and
    is written on the first change), all on one loaded model."""
    if not specs:
        raise InvalidArgumentError("give at least one memory: --memory DIR or --memory NAME=DIR")
    base = MSAEngine.from_pretrained(model, router=router, device=device, **overrides)
    config = base.config  # before any load: each memory adopts its own routing chunk size, not the first one's
    default_router = base.router if base.has_trained_router else None  # before any memory's own router
    memories, folders = {}, {}
    for i, spec in enumerate(specs):
        name, _, directory = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or os.path.basename(os.path.normpath(directory)) or f"memory{i}"
        if name in memories:
            raise InvalidArgumentError(f"two memories are named {name!r}; name them: --memory NAME=DIR")
        real = os.path.realpath(directory)
        if real in folders:  # each would save its own copy over the other's
            raise InvalidArgumentError(f"memories {folders[real]!r} and {name!r} are the same folder {real!r}; serve "
                                       "a folder once (one name), or give each memory its own folder")
        folders[real] = name
        engine = base if i == 0 else sibling_engine(base, config, router=default_router)
        if os.path.exists(os.path.join(directory, "manifest.json")):
            keyed_by = None if router is not None else MSAEngine.router_for_memory(directory, model)
            if keyed_by is not None:  # an adapted memory, or one keyed by an earlier shipped router
                engine.set_router(keyed_by)  # the engine's memory is still empty: nothing to re-key
            engine.load(directory)
        memories[name] = Memory(name, engine, directory)
    return memories


# ---------------------------------------------------------------------------------------------- requests
def _where(body: dict):
    """An MSA `where` from the request's filters (metadata field -> value or list of values) and ids
    (None: no restriction besides the collection)."""
    filters, ids = body.get("filters"), body.get("ids")
    if filters is not None and not isinstance(filters, dict):
        raise APIError(422, 'filters must be an object {"field": value or [values]}', param="filters")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
        raise APIError(422, "ids must be a list of document ids (strings)", param="ids")
    for key, want in (filters or {}).items():  # the server's filters are values, not the vector store's operators
        if isinstance(want, dict) or str(key).startswith("$"):
            raise APIError(422, f'filters match metadata values: {{"field": value or [values]}}; {key!r} holds '
                                f"{want!r}, an operator this server does not read", param="filters")
    if not filters and ids is None:
        return None
    allowed = None if ids is None else set(ids)

    def admits(doc) -> bool:
        if allowed is not None and doc.id not in allowed and doc.id.split("#")[0] not in allowed:
            return False
        for key, want in (filters or {}).items():
            have = doc.metadata.get(key)
            if isinstance(want, list) and have not in want or not isinstance(want, list) and have != want:
                return False
        return True

    return admits


# what /v1/memories/{m}/search reads (rounds, k_per_round, rerank: MSAEngine.retrieve's, k in all by default)
_SEARCH_FIELDS = {"query", "k", "collection", "filters", "ids", "rounds", "k_per_round", "rerank"}
# request fields that only answers from memory read (a plain chat, use_memory false, has no routing)
_MEMORY_FIELDS = ("k", "mode", "rounds", "k_per_round", "rerank", "prompt_style", "collection", "filters", "ids")


def _flag(body: dict, key: str, default: bool) -> bool:
    """A JSON boolean field ("false", a string, would be truthy: refused rather than read as true)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(422, f"{key} must be true or false, got {value!r}", param=key)
    return value


def _refuse_unknown(fields, known, where: str) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise APIError(422, f"unknown field(s) {unknown} in {where}; the fields are {sorted(known)}",
                       param=unknown[0])


# OpenAI chat-completion fields: read, refused when set to what this server cannot do, or bookkeeping it may
# ignore (they change no answer); MSA's own fields are _MEMORY_FIELDS + memory / use_memory
_CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "stream",
                "stream_options", "n", "tools", "functions", "tool_choice", "function_call", "parallel_tool_calls",
                "response_format", "logprobs", "top_logprobs", "top_p", "presence_penalty", "frequency_penalty",
                "logit_bias", "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
                "modalities", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options",
                "memory", "use_memory", *_MEMORY_FIELDS}
# OpenAI fields that change the answer, with the value that changes nothing (anything else: 422)
_NEUTRAL = {"top_p": (1, 1.0), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
            "top_logprobs": (0,), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
            "parallel_tool_calls": (True, False), "modalities": (["text"],), "audio": (), "prediction": (),
            "reasoning_effort": (), "verbosity": (), "web_search_options": ()}


def _collection(body: dict) -> dict:
    """The `collection` keyword for the engine when the request names one (else the engine's default:
    the "default" collection; "*" reads every collection)."""
    c = body.get("collection")
    if c is None:
        return {}
    if not isinstance(c, str):
        raise APIError(422, "collection must be a string", param="collection")
    return {"collection": c}


def _text_of(content) -> str:
    """A message's content: a string, or OpenAI's list of parts (the text parts, joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(parts) != len(content):
            raise APIError(422, "only text content parts are supported", param="messages")
        return "".join(parts)
    if content is None:
        return ""
    raise APIError(422, "message content must be a string or a list of text parts", param="messages")


def _split_messages(messages) -> tuple:
    """OpenAI messages -> (system or None, history, question, all turns): the last user message is the
    question, the earlier user/assistant turns its history."""
    if not isinstance(messages, list) or not messages:
        raise APIError(422, "messages must be a non-empty list", param="messages")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(422, "each message needs a role of system, user or assistant (tool messages are not "
                                "supported)", param="messages")
        turns.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _text_of(m.get("content"))})
    system = "\n".join(t["content"] for t in turns if t["role"] == "system") or None
    dialog = [t for t in turns if t["role"] != "system"]
    if not dialog or dialog[-1]["role"] != "user":
        raise APIError(422, "the last message must be the user's question", param="messages")
    return system, dialog[:-1], dialog[-1]["content"], turns


def _sources(documents) -> list:
    return [{"id": d.id, "text": d.text, "score": None if math.isnan(d.score) else d.score, "metadata": d.metadata,
             "collection": d.collection, "round": d.round, "rank": d.rank} for d in documents]


class _Slots:
    """Requests in flight (answering, or waiting for a batch slot). Over batch + queue: 429."""

    def __init__(self, limit: int):
        self.limit, self.n = limit, 0
        self._lock = threading.Lock()

    def take(self, retry_after: int) -> "_Slot":
        with self._lock:
            if self.n >= self.limit:
                raise APIError(429, f"the server is busy ({self.n} requests in flight, the limit); retry later",
                               "rate_limit_error", "too_many_requests", headers={"Retry-After": str(retry_after)})
            self.n += 1
        return _Slot(self)


class _Slot:
    def __init__(self, slots: _Slots):
        self._slots, self._held = slots, True

    def release(self) -> None:
        with self._slots._lock:
            if self._held:
                self._held = False
                self._slots.n -= 1


class _PieceReader:
    """Reads a `Stream` from worker threads, one piece per call; `close` waits for a read in progress
    (a generator cannot be closed while it runs), then ends generation and frees the batch slot."""

    def __init__(self, stream):
        self.stream = stream
        self._it = iter(stream)
        self._lock = threading.Lock()

    def next(self) -> Optional[str]:
        with self._lock:
            return next(self._it, None)

    def close(self) -> None:
        with self._lock:
            self._it.close()
            self.stream.close()


def _chunk(cid: str, created: int, model: str, delta: Optional[dict] = None, finish: Optional[str] = None,
           **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}
    return f"data: {json.dumps(body)}\n\n"


# ---------------------------------------------------------------------------------------------- the app
def create_app(memories: dict, settings: Optional[ServerSettings] = None):
    """The FastAPI app over `memories` (name -> `Memory`, or name -> `MSAEngine`). One batch scheduler
    per distinct model runs while the app is up."""
    from contextlib import asynccontextmanager

    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.background import BackgroundTask

    settings = settings or ServerSettings()
    memories = {name: m if isinstance(m, Memory) else Memory(name, m) for name, m in memories.items()}
    if not memories:
        raise InvalidArgumentError("the server needs at least one memory")
    default_name = next(iter(memories))
    metrics = Metrics()
    slots = _Slots(settings.max_batch + settings.max_queue)
    schedulers = {}
    for m in memories.values():
        model = m.engine.model
        if id(model) not in schedulers:
            schedulers[id(model)] = batched(m.engine, max_batch=settings.max_batch)
    metrics.gauges["msa_requests_in_flight"] = ("requests being answered or waiting", lambda: slots.n)
    metrics.gauges["msa_queue_depth"] = ("sequences waiting for a batch slot",
                                         lambda: sum(s.waiting for s in schedulers.values()))
    metrics.gauges["msa_active_sequences"] = ("sequences decoding in the batch",
                                              lambda: sum(s.live for s in schedulers.values()))
    metrics.gauges["msa_memory_documents"] = ("documents over all memories",
                                              lambda: sum(len(m.engine) for m in memories.values()))

    @asynccontextmanager
    async def lifespan(app):
        for s in schedulers.values():
            s.start()
        try:
            yield
        finally:
            for s in schedulers.values():
                s.stop()

    app = FastAPI(title="msa-plugins", lifespan=lifespan)
    app.state.memories, app.state.settings, app.state.metrics = memories, settings, metrics

    def error_response(e: APIError):
        body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(MSAError)
    async def _msa_error(request, e: MSAError):
        status, type_, code = _status_of(e)
        return error_response(APIError(status, str(e), type_, code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_response(APIError(422, f"{where}: {first.get('msg', 'invalid request')}", param=where))

    @app.exception_handler(404)
    async def _not_found(request, e):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def _not_allowed(request, e):
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.scope.get("route").path if request.scope.get("route") is not None else "other"
        metrics.inc("msa_requests_total", endpoint=endpoint, status=str(response.status_code))
        if not isinstance(response, StreamingResponse) or endpoint != "/v1/chat/completions":
            metrics.observe("msa_request_seconds", time.perf_counter() - t0, endpoint=endpoint)
        return response

    # -------------------------------------------------------------- request helpers
    def allowed(request: Request) -> Optional[set]:
        """Memory names the caller may use (None: all). No key configured: everyone may use all."""
        if not settings.api_keys:
            return None
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if key not in settings.api_keys:
            raise APIError(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", "invalid_api_key")
        names = settings.api_keys[key]
        return None if names in ("*", None) or "*" in names else set(names)

    def memory_for(request: Request, name: str) -> Memory:
        if name not in memories:
            raise APIError(404, f"no memory named {name!r}; GET /v1/models lists them", code="model_not_found",
                           param="model")
        names = allowed(request)
        if names is not None and name not in names:
            raise APIError(403, f"this API key may not use the memory {name!r}", "permission_error",
                           "memory_not_allowed")
        return memories[name]

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise APIError(413, f"the request body ({length} bytes) is over the limit of {settings.max_body_bytes} "
                                "bytes", code="request_too_large")
        body, size = bytearray(), 0
        async for part in request.stream():
            size += len(part)
            if size > settings.max_body_bytes:
                raise APIError(413, f"the request body is over the limit of {settings.max_body_bytes} bytes",
                               code="request_too_large")
            body += part
        try:
            data = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        return data

    def run(fn, *args, **kwargs):
        return anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    # -------------------------------------------------------------- OpenAI endpoints
    @app.get("/health")
    async def health():
        return {"status": "ok", "memories": {n: len(m.engine) for n, m in memories.items()},
                "batch": {"live": sum(s.live for s in schedulers.values()),
                          "waiting": sum(s.waiting for s in schedulers.values()), "in_flight": slots.n}}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        names = allowed(request)
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "msa-plugins", "root": m.engine.model_name}
            for n, m in memories.items() if names is None or n in names]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        body = await read_json(request)
        _refuse_unknown(body, _CHAT_FIELDS, "a chat completion")
        for key in ("memory", "model"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise APIError(422, f"{key} must be a string (a memory's name)", param=key)
        name = body.get("memory")
        if name is None:
            model = body.get("model")
            name = model if model in memories else default_name if model in (
                None, "", "default", memories[default_name].engine.model_name) else model
        memory = memory_for(request, name)
        engine = memory.engine
        for unsupported in ("tools", "functions", "response_format", "logprobs"):
            if body.get(unsupported) not in (None, False, [], {"type": "text"}):
                raise APIError(422, f"{unsupported} is not supported by this server", param=unsupported)
        if body.get("n", 1) not in (1, None):
            raise APIError(422, "n must be 1", param="n")
        for key, neutral in _NEUTRAL.items():
            if body.get(key) is not None and body[key] not in neutral:
                raise APIError(422, f"{key}={body[key]!r} is not supported by this server (it would change the answer; "
                                    "drop it)", param=key)
        stream_wanted = _flag(body, "stream", False)
        stream_options = body.get("stream_options")
        if stream_options is not None:  # checked before a request slot is taken
            if not stream_wanted:
                raise APIError(422, "stream_options applies only when stream is true", param="stream_options")
            if not isinstance(stream_options, dict) or not isinstance(stream_options.get("include_usage", False), bool):
                raise APIError(422, 'stream_options must be an object {"include_usage": true or false}',
                               param="stream_options")
        include_usage = bool((stream_options or {}).get("include_usage"))
        system, history, question, turns = _split_messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = settings.default_max_tokens or engine.answer_defaults.max_new_tokens
        try:
            check_int(max_tokens, "max_tokens", minimum=1, maximum=settings.max_tokens)
            temperature = check_temperature(body.get("temperature", 0.0) if body.get("temperature") is not None else 0.0)
            stop = check_stop(body.get("stop"))
            seed = body.get("seed")
            if seed is not None:
                check_int(seed, "seed", minimum=-(2 ** 63), maximum=2 ** 64 - 1)  # AnswerOptions' range
        except MSAError as e:
            raise APIError(422, str(e), param=str(e).split()[0]) from None
        opts = {"max_new_tokens": max_tokens, "temperature": temperature, "stop": stop, "seed": seed,
                "system": system}
        for key, choices in (("mode", MODES), ("prompt_style", PROMPT_STYLES)):
            if body.get(key) is not None:
                if body[key] not in choices:
                    raise APIError(422, f"{key} must be one of {list(choices)}", param=key)
                opts[key] = body[key]
        for key in ("k", "rounds", "k_per_round", "rerank"):
            if body.get(key) is not None:
                opts[key] = body[key]
        AnswerOptions().merged(**opts)  # every option checked before any model work (422 on a bad one)
        limit = settings.max_prompt_tokens
        if limit is not None:
            n_prompt = sum(engine.count_tokens(t["content"]) for t in turns if t["content"])
            if n_prompt > limit:
                raise APIError(422, f"the messages have {n_prompt} tokens, more than this server's limit of {limit}",
                               code="context_length_exceeded", param="messages")
        use_memory = _flag(body, "use_memory", True)
        if not use_memory:  # a memory option on a plain chat would be dropped: say so instead
            for key in _MEMORY_FIELDS:
                if body.get(key) is not None:
                    raise APIError(422, f"{key} applies to answers from memory, and use_memory is false: drop "
                                        f"{key} or set use_memory to true", param=key)
        where, collection = _where(body), _collection(body)
        slot = slots.take(settings.retry_after_s)
        try:
            if use_memory:
                stream = await run(engine.stream, question, where=where, history=history, **collection, **opts)
            else:
                stream = await run(engine.stream_generate, turns, **{
                    k: v for k, v in opts.items() if k in ("max_new_tokens", "temperature", "stop", "seed")})
        except BaseException:
            slot.release()
            raise
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        sources = _sources(stream.documents)
        reader = _PieceReader(stream)
        t_first = [None]

        def finish(result) -> None:
            metrics.inc("msa_prompt_tokens_total", result.prompt_tokens)
            metrics.inc("msa_completion_tokens_total", result.completion_tokens)
            timings = result.timings
            for key, series in (("routing_s", "msa_routing_seconds"), ("prefill_s", "msa_prefill_seconds"),
                                ("decode_s", "msa_decode_seconds")):
                if key in timings:
                    metrics.observe(series, timings[key])
            if t_first[0] is not None:
                metrics.observe("msa_time_to_first_token_seconds", t_first[0] - t0)

        async def close():
            with anyio.CancelScope(shield=True):  # also when the client went away mid-stream
                await run(reader.close)
            slot.release()

        if stream_wanted:
            async def events():
                try:
                    yield _chunk(cid, created, name, {"role": "assistant", "content": ""}, sources=sources)
                    while True:
                        piece = await run(reader.next)
                        if piece is None:
                            break
                        if t_first[0] is None:
                            t_first[0] = time.perf_counter()
                        yield _chunk(cid, created, name, {"content": piece})
                    await run(reader.close)
                    result = stream.result
                    finish(result)
                    yield _chunk(cid, created, name, {}, result.finish_reason)
                    if include_usage:
                        yield _chunk(cid, created, name, usage=result.usage)
                    yield "data: [DONE]\n\n"
                    metrics.observe("msa_request_seconds", time.perf_counter() - t0, endpoint="/v1/chat/completions")
                finally:
                    await close()

            gen = events()
            weakref.finalize(gen, slot.release)  # a response never started still frees its slot
            return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(slot.release),
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        try:
            while True:
                piece = await run(reader.next)
                if piece is None:
                    break
                if t_first[0] is None:
                    t_first[0] = time.perf_counter()
                if await request.is_disconnected():  # nobody will read the answer: free the slot now
                    logger.info("client disconnected; generation stopped")
                    return JSONResponse({}, status_code=499)
            await run(reader.close)
        finally:
            await close()
        result = stream.result
        finish(result)
        text = result.answer if hasattr(result, "answer") else result.text
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": result.finish_reason}],
                "usage": result.usage, "sources": sources, "system_fingerprint": None}

    # -------------------------------------------------------------- memory endpoints
    @app.get("/v1/memories")
    async def list_memories(request: Request):
        names = allowed(request)
        return {"object": "list", "data": [
            {"id": n, "object": "memory", "documents": len(m.engine), "persistent": bool(m.directory)}
            for n, m in memories.items() if names is None or n in names]}

    @app.post("/v1/memories/{name}/documents")
    async def add_documents(name: str, request: Request):
        memory = memory_for(request, name)
        body = await read_json(request)
        _refuse_unknown(body, ("documents", "collection", "upsert"), "an add")
        docs = body.get("documents")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, dict) for d in docs):
            raise APIError(422, 'documents must be a non-empty list of {"text", "id", "metadata"}', param="documents")
        for d in docs:
            _refuse_unknown(d, ("text", "id", "metadata"), "a document")
        upsert = _flag(body, "upsert", False)
        collection = _collection(body)
        texts = [d.get("text") for d in docs]
        ids = [d.get("id") for d in docs]
        metadata = [d.get("metadata") or {} for d in docs]
        if upsert:
            if any(i is None for i in ids):
                raise APIError(422, "upsert needs an id for every document", param="documents")
            done = await run(memory.write, lambda: memory.engine.upsert(texts, ids, metadata=metadata, progress=False,
                                                                        **collection))
        else:
            given = None if all(i is None for i in ids) else ids
            done = await run(memory.write, lambda: memory.engine.add(texts, ids=given, metadata=metadata,
                                                                     progress=False, **collection))
        return {"object": "list", "ids": done, "documents": len(memory.engine)}

    @app.get("/v1/memories/{name}/documents")
    async def list_documents(name: str, request: Request, collection: Optional[str] = None, limit: int = 100,
                             offset: int = 0):
        memory = memory_for(request, name)
        if not 1 <= limit <= 10_000 or offset < 0:
            raise APIError(422, "limit must be 1..10000 and offset >= 0", param="limit")
        snap = memory.engine.snapshot()
        docs = list(snap.documents(collection))
        return {"object": "list", "total": len(docs), "data": [
            {"id": d.id, "text": d.text, "metadata": d.metadata, "collection": d.collection, "n_tokens": d.n_tokens}
            for d in docs[offset:offset + limit]]}

    @app.get("/v1/memories/{name}/documents/{doc_id:path}")
    async def get_document(name: str, doc_id: str, request: Request):
        memory = memory_for(request, name)
        parts = memory.engine.get([doc_id])
        return {"id": doc_id, "collection": parts[0].collection, "text": "".join(d.text for d in parts),
                "parts": [{"id": d.id, "text": d.text, "metadata": d.metadata, "n_tokens": d.n_tokens} for d in parts]}

    @app.delete("/v1/memories/{name}/documents/{doc_id:path}")
    async def delete_document(name: str, doc_id: str, request: Request, collection: str = "*"):
        memory = memory_for(request, name)  # ids are unique across collections: any collection by default
        deleted = await run(memory.write, lambda: memory.engine.delete([doc_id], collection=collection))
        return {"deleted": deleted, "documents": len(memory.engine)}

    @app.post("/v1/memories/{name}/documents/delete")
    async def delete_documents(name: str, request: Request):
        memory = memory_for(request, name)
        body = await read_json(request)
        _refuse_unknown(body, ("ids", "filters", "collection", "missing_ok"), "a delete")
        ids = body.get("ids")
        where = _where({"filters": body.get("filters")})
        collection = _collection(body).get("collection", "*")
        if ids is None and where is None and collection == "*":
            raise APIError(422, "give ids, filters or a collection of the documents to delete", param="ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise APIError(422, "ids must be a list of document ids (strings)", param="ids")
        missing_ok = _flag(body, "missing_ok", False)

        def delete():
            if ids is not None:
                return memory.engine.delete(ids, missing_ok=missing_ok, collection=collection)
            targets = memory.engine.snapshot().select(where, collection=collection)
            return memory.engine.delete(targets, collection=collection) if targets else []

        deleted = await run(memory.write, delete)
        return {"deleted": deleted, "documents": len(memory.engine)}

    @app.post("/v1/memories/{name}/search")
    async def search(name: str, request: Request):
        memory = memory_for(request, name)
        body = await read_json(request)
        query = body.get("query")
        if not isinstance(query, str):
            raise APIError(422, "query must be a string", param="query")
        unknown = sorted(set(body) - _SEARCH_FIELDS)
        if unknown:
            raise APIError(422, f"unknown search field(s) {unknown}; the fields are {sorted(_SEARCH_FIELDS)}",
                           param=unknown[0])
        rounds = {key: body[key] for key in ("rounds", "k_per_round", "rerank") if body.get(key) is not None}
        docs = await run(memory.engine.retrieve, query, k=body.get("k"), where=_where(body), **_collection(body),
                         **rounds)
        return {"object": "list", "data": _sources(docs)}

    return app


# ---------------------------------------------------------------------------------------------- running
class ServerThread:
    """Run an app with uvicorn on a background thread (tests, benchmarks, notebooks). port=0 picks a free
    port; `.url` is the base URL once `start()` returns."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="msa-serve", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_keys(specs: list) -> dict:
    """--api-key KEY (all memories) or KEY=mem1,mem2; also MSA_API_KEYS (the same, ';'-separated)."""
    keys = {}
    for spec in list(specs or []) + [s for s in os.environ.get("MSA_API_KEYS", "").split(";") if s]:
        key, _, names = spec.partition("=")
        if not key:
            raise InvalidArgumentError(f"bad --api-key {spec!r}; use KEY or KEY=memory1,memory2")
        keys[key] = "*" if not names else {n for n in names.split(",") if n}
    return keys


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """`msa serve` under the CLI's sub-commands (--model, --router, --device come from the main parser)."""
    s = subparsers.add_parser("serve", help="serve memories over an OpenAI-compatible HTTP API")
    _add_serve_arguments(s)
    s.set_defaults(fn=run_serve)
    return s


def _add_serve_arguments(s) -> None:
    d = ServerSettings()
    s.add_argument("--memory", action="append", required=True, metavar="[NAME=]DIR",
                   help="a memory folder (repeat for several; created on the first write if missing)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=[], metavar="KEY[=MEM,...]",
                   help="require this bearer key (repeat; =MEM,... limits it to those memories); also MSA_API_KEYS")
    s.add_argument("--max-batch", type=int, default=d.max_batch, help="sequences decoded together")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting beyond the batch (then 429)")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a request may ask")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="largest prompt (default: the model's window)")
    s.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    s.add_argument("-k", "--k", type=int, default=None, help="default documents per question")
    s.add_argument("--log-level", default="info")
    s.add_argument("--nproc", type=int, default=1,
                   help="route memory-parallel over this many processes (gloo on this machine; this one is rank 0 "
                        "and answers HTTP). Under torchrun the group comes from the environment instead")


def _start_sharding(nproc: int):
    """The memory-parallel group of `--nproc N` or torchrun (None: route in this process). Under torchrun
    only rank 0 gets here; the other ranks serve routing in `run_serve` before loading anything."""
    from .engine.sharding import ShardGroup, torchrun_rank

    check_int(nproc, "--nproc", minimum=1)
    if torchrun_rank() is not None:
        if nproc > 1:
            raise InvalidArgumentError("give --nproc or run under torchrun, not both")
        return ShardGroup.from_env()
    return ShardGroup.spawn(nproc) if nproc > 1 else None


def run_serve(args) -> int:
    """Load the model and memories, then serve until interrupted. With --nproc N (or under torchrun) the
    memories are routed memory-parallel: rank 0 (this process) serves and holds every memory whole, each
    rank scores a shard of it (engine/sharding.py); the answers are those of one process."""
    import uvicorn

    from .engine.sharding import torchrun_rank, worker_from_env

    if torchrun_rank() not in (None, 0):  # a torchrun worker rank needs no model: rank 0 ships its shards
        worker_from_env()
        return 0
    overrides = {"k": args.k} if getattr(args, "k", None) else {}
    memories = open_memories(args.memory, model=getattr(args, "model", None), router=getattr(args, "router", None),
                             device=getattr(args, "device", None), **overrides)
    settings = ServerSettings(max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
                              max_tokens=args.max_tokens, max_batch=args.max_batch, max_queue=args.max_queue,
                              api_keys=_parse_keys(args.api_key))
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        logger.warning("serving on %s without an API key: anyone who can reach it may read and change the memories",
                       args.host)
    shards = _start_sharding(getattr(args, "nproc", 1))
    try:
        for memory in memories.values():
            if shards is not None:
                memory.engine.use_sharded_routing(shards.router())
        app = create_app(memories, settings)
        logger.info("serving %s on http://%s:%d/v1%s", ", ".join(memories), args.host, args.port,
                    f" (routing over {shards.world} processes)" if shards is not None else "")
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if shards is not None:
            shards.stop()
    return 0


def main(argv=None) -> int:
    """`python -m msa_plugins.server --memory DIR ...` (the same as `msa serve`)."""
    p = argparse.ArgumentParser(prog="msa serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--router", default=None)
    p.add_argument("--device", default=None)
    _add_serve_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="msa: %(message)s")
    return run_serve(args)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["create_app", "ServerSettings", "ServerThread", "Memory", "open_memories", "sibling_engine",
           "add_serve_parser", "run_serve", "Metrics"]
