"""langchain-tests standard suites for ChatMSA, MSARetriever and MSAVectorStore, on a tiny random model.

A random-weight model makes the suites check mechanics (types, streaming, async, usage metadata, ids, deletes,
filters), not answer quality. What the suites assume and MSA cannot honestly do is declared or skipped with a
reason, below."""

import os
import tempfile

import pytest

pytest.importorskip("langchain_tests")

from langchain_core.vectorstores import VectorStore  # noqa: E402
from langchain_tests.integration_tests import (ChatModelIntegrationTests, RetrieversIntegrationTests,  # noqa: E402
                                               VectorStoreIntegrationTests)
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402
from msa_plugins.integrations.langchain import ChatMSA, MSARetriever, MSAVectorStore  # noqa: E402

# the suites' async tests carry no marker (they expect asyncio_mode=auto); mark them here
pytestmark = [pytest.mark.asyncio(loop_scope="function"),
              pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio'")]

_CACHE = {}
FACTS = ["Paris is the capital of France.", "Alice was born in 1990 in Lisbon.",
         "The quick brown fox jumps over the lazy dog.", "Memory sparse attention routes each question."]


def _model_dir() -> str:
    if "dir" not in _CACHE:
        from tiny_models import make_tiny_model
        _CACHE["dir"] = make_tiny_model("llama", os.path.join(tempfile.mkdtemp(prefix="msa-lc-"), "llama"),
                                        max_position_embeddings=2048)
    return _CACHE["dir"]


def _engine(fresh: bool = False):
    if fresh:
        return MSAEngine.from_pretrained(_model_dir(), device="cpu")
    if "engine" not in _CACHE:
        e = MSAEngine.from_pretrained(_model_dir(), device="cpu", k=2)
        e.add(FACTS, ids=[f"f{i}" for i in range(len(FACTS))], progress=False)
        _CACHE["engine"] = e
    return _CACHE["engine"]


class _ChatMSASuite:
    """What both standard suites need to know about ChatMSA."""

    @property
    def chat_model_class(self):
        return ChatMSA

    @property
    def chat_model_params(self):
        engine = _engine()
        return {"engine": engine, "model": engine.model_name}

    @property
    def has_tool_calling(self):
        return False  # a JSON protocol in the prompt: the random-weight test model cannot follow it (apps test it)

    @property
    def has_structured_output(self):
        return False

    @property
    def returns_usage_metadata(self):
        return True

    @property
    def supports_model_override(self):
        return False  # one engine = one loaded model; a per-call `model=` cannot switch it


class TestChatMSAUnit(_ChatMSASuite, ChatModelUnitTests):
    # ChatMSA's settings serialize (dumpd / to_json give plain JSON), but the engine (a loaded model and its
    # memory) is live state excluded from them, so `load` alone cannot rebuild the model: rebuild with
    # ChatMSA(engine=engine, **dumpd(llm)["kwargs"]) (tests/test_langchain.py::test_chat_serialization).
    @property
    def has_tool_calling(self):
        return True  # bind_tools / with_structured_output build for every tool form (invoking needs a real model)

    @property
    def has_structured_output(self):
        return True

    @pytest.mark.xfail(reason="the engine is excluded from dumpd; load() needs it passed again", strict=True)
    def test_serdes(self, model, snapshot) -> None:
        super().test_serdes(model, snapshot)


class TestChatMSAIntegration(_ChatMSASuite, ChatModelIntegrationTests):
    @property
    def standard_chat_model_params(self):
        params = super().standard_chat_model_params
        params["max_tokens"] = 6  # the suite's 100 tokens x ~40 calls is minutes on a shared 2-core CPU
        return params

    @property
    def supports_json_mode(self):
        return False

    @property
    def supported_usage_metadata_details(self):
        return {"invoke": [], "stream": []}


class TestMSARetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self):
        return MSARetriever

    @property
    def retriever_constructor_params(self):
        return {"engine": _engine(), "k": 2}

    @property
    def retriever_query_example(self):
        return "Where was Alice born?"


class TestMSAVectorStoreStandard(VectorStoreIntegrationTests):
    @pytest.fixture()
    def vectorstore(self) -> VectorStore:
        store = MSAVectorStore(_engine(fresh=True))
        yield store
        store.delete(store.engine.snapshot().ids)

    # The six tests below assert that the top hit for a query is the document with the identical text ("bar"
    # for "bar"). With embeddings that is what similarity means; MSA ranks with the model's router (question-
    # token queries vs chunk-pooled keys), and how a router ranks a one-word text is a property of its
    # training, not of the store: the random-weight test model ranks arbitrarily. They still run; only an
    # AssertionError (the ranking check) is expected, any other error fails. The store mechanics they also cover
    # (ids kept, upsert without duplicates, metadata replaced, originals not mutated) are asserted without
    # ranking in tests/test_langchain.py.
    _RANKING = "asserts identical-text-first ranking, which needs an embedding or a trained router"

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    def test_add_documents(self, vectorstore):
        super().test_add_documents(vectorstore)

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    def test_add_documents_with_ids_is_idempotent(self, vectorstore):
        super().test_add_documents_with_ids_is_idempotent(vectorstore)

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    def test_add_documents_by_id_with_mutation(self, vectorstore):
        super().test_add_documents_by_id_with_mutation(vectorstore)

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    async def test_add_documents_async(self, vectorstore):
        await super().test_add_documents_async(vectorstore)

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    async def test_add_documents_with_ids_is_idempotent_async(self, vectorstore):
        await super().test_add_documents_with_ids_is_idempotent_async(vectorstore)

    @pytest.mark.xfail(reason=_RANKING, raises=AssertionError, strict=False)
    async def test_add_documents_by_id_with_mutation_async(self, vectorstore):
        await super().test_add_documents_by_id_with_mutation_async(vectorstore)
