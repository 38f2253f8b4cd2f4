"""`MSAVectorStore` as a LlamaIndex vector store, modelled on llama-index-vector-stores-chroma's tests (class MRO,
add / query / delete / filters / get_nodes / clear), plus what MSA adds: collections, refused knobs, persistence.
llama-index-core ships no reusable vector-store test suite. Tiny random model: mechanics, never ranking quality."""

import os

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (BasePydanticVectorStore, FilterOperator,  # noqa: E402
                                                  MetadataFilter, MetadataFilters, VectorStoreQuery,
                                                  VectorStoreQueryMode)

from msa_plugins import InvalidArgumentError, InvalidTypeError, MSAEngine  # noqa: E402
from msa_plugins.integrations.llama_index import MSAVectorStore, NoEmbedding  # noqa: E402


@pytest.fixture(scope="module")
def engine_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture()
def engine(engine_dir):
    return MSAEngine.from_pretrained(engine_dir, device="cpu")


@pytest.fixture()
def store(engine):
    return MSAVectorStore(engine)


def _node(node_id, text, ref, **metadata):
    return TextNode(id_=node_id, text=text, metadata=metadata,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref)})


@pytest.fixture()
def nodes():
    return [_node("n1", "Paris is the capital of France.", "doc-fr", country="fr", year=2001, tags=["city", "eu"]),
            _node("n2", "Alice was born in Lisbon and is a painter.", "doc-pt", country="pt", year=1990),
            _node("n3", "The quick brown fox jumps over the lazy dog.", "doc-uk", country="uk", year=2010),
            _node("n4", "Berlin is the capital of Germany.", "doc-fr", country="de", year=2005, tags=["city"])]


def _query(text="Where is the capital?", **kw):
    return VectorStoreQuery(query_str=text, **{"similarity_top_k": 4, **kw})


def test_class():
    names = [b.__name__ for b in MSAVectorStore.__mro__]
    assert BasePydanticVectorStore.__name__ in names
    assert MSAVectorStore.model_fields["stores_text"].default is True
    assert MSAVectorStore.model_fields["is_embedding_query"].default is False


def test_construction_needs_an_engine(engine):
    with pytest.raises(TypeError, match="needs an MSAEngine"):
        MSAVectorStore(NoEmbedding())  # the literal swap of an embedding model fails here, clearly
    with pytest.raises(TypeError):
        MSAVectorStore()
    with pytest.raises(ValueError, match="collection"):
        MSAVectorStore(engine, collection_name="a*")
    assert MSAVectorStore(engine).client is engine
    # Chroma-style knobs were accepted and dropped (collection= read the "default" collection): now refused
    for knob, hint in (({"collection": "t"}, "collection_name="), ({"persist_dir": "x"}, "from_persist_dir"),
                       ({"bogus": 1}, "unknown argument")):
        with pytest.raises(ValueError, match=hint):
            MSAVectorStore(engine, **knob)
    assert MSAVectorStore(engine, collection_name="t", flat_metadata=False).collection_name == "t"


def test_add_and_query(store, nodes, engine):
    assert store.add(nodes) == ["n1", "n2", "n3", "n4"]
    assert len(engine) == 4
    res = store.query(_query(similarity_top_k=2))
    assert len(res.nodes) == len(res.ids) == len(res.similarities) == 2
    assert [n.node_id for n in res.nodes] == res.ids
    assert res.similarities == sorted(res.similarities, reverse=True)
    routed = engine.retrieve("Where is the capital?", k=2)
    assert res.ids == [d.id for d in routed]
    # the node comes back as stored: text, metadata, source relationship
    n1 = store.get_nodes(node_ids=["n1"])[0]
    assert n1.get_content() == nodes[0].get_content() and n1.metadata == nodes[0].metadata
    assert n1.ref_doc_id == "doc-fr"


def test_add_replaces_an_existing_node(store, nodes, engine):
    store.add(nodes)
    store.add([_node("n2", "Alice now lives in Porto.", "doc-pt", country="pt", year=1990)])
    assert len(engine) == 4
    assert store.get_nodes(node_ids=["n2"])[0].get_content() == "Alice now lives in Porto."


def test_query_with_filters(store, nodes):
    store.add(nodes)
    eq = MetadataFilters(filters=[MetadataFilter(key="country", value="pt")])
    assert store.query(_query(filters=eq)).ids == ["n2"]
    gt = MetadataFilters(filters=[MetadataFilter(key="year", value=2002, operator=FilterOperator.GT)])
    assert sorted(store.query(_query(filters=gt)).ids) == ["n3", "n4"]
    either = MetadataFilters(condition="or", filters=[MetadataFilter(key="country", value="pt"),
                                                      MetadataFilter(key="country", value="uk")])
    assert sorted(store.query(_query(filters=either)).ids) == ["n2", "n3"]
    contains = MetadataFilters(filters=[MetadataFilter(key="tags", value="eu", operator=FilterOperator.CONTAINS)])
    assert store.query(_query(filters=contains)).ids == ["n1"]
    none = MetadataFilters(filters=[MetadataFilter(key="country", value="zz")])
    res = store.query(_query(filters=none))
    assert res.ids == [] and res.nodes == []


def test_query_with_node_ids_and_doc_ids(store, nodes):
    store.add(nodes)
    assert sorted(store.query(_query(node_ids=["n1", "n3"])).ids) == ["n1", "n3"]
    assert sorted(store.query(_query(doc_ids=["doc-fr"])).ids) == ["n1", "n4"]
    # an empty node_ids list restricts nothing in a query: VectorStoreIndex.as_retriever passes node_ids=[] to a
    # store that keeps its text (SimpleVectorStore, which does not, is never given [] by it)
    assert len(store.query(_query(node_ids=[])).ids) == 4
    assert store.get_nodes(node_ids=[]) == []  # but "the nodes with these ids" of no ids is no node
    assert len(store.get_nodes(node_ids=None)) == 4


def test_mmr_reranks_routed_candidates_for_diversity(store, engine):
    """MMR as LlamaIndex's stores do it (Chroma's knobs): routing scores as relevance, pooled routing keys
    as document vectors, LlamaIndex's own get_top_k_mmr_embeddings; similarities stay routing scores."""
    dup = "The robot Tilly repairs bicycles in the harbour workshop every Tuesday."
    store.add([_node("a", dup, "d1"), _node("b", dup + " Really.", "d2"), _node("c", dup + " Truly.", "d3"),
               _node("d", "Rye bread with caraway seeds is sold on Elm Street today.", "d4")])
    routed = store.query(_query("bicycles", similarity_top_k=4))
    # threshold 1: relevance only, i.e. routing order
    only_relevance = store.query(_query("bicycles", similarity_top_k=2, mode=VectorStoreQueryMode.MMR),
                                 mmr_threshold=1.0)
    assert only_relevance.ids == routed.ids[:2] and only_relevance.similarities == routed.similarities[:2]
    # diversity weighs in: the best routed node first, then never a near-copy of it while the odd text is left
    diverse = store.query(_query("bicycles", similarity_top_k=2, mode=VectorStoreQueryMode.MMR), mmr_threshold=0.1)
    assert diverse.ids[0] == routed.ids[0] and "d" in diverse.ids
    by_id = dict(zip(routed.ids, routed.similarities))
    assert diverse.similarities == [by_id[i] for i in diverse.ids]  # routing scores, not MMR scores
    # VectorStoreQuery.mmr_threshold is read too (a vector_store_kwargs value wins)
    assert store.query(_query("bicycles", similarity_top_k=2, mode="mmr", mmr_threshold=0.1)).ids == diverse.ids
    # the candidates are similarity_top_k * mmr_prefetch_factor (or mmr_prefetch_k) routed nodes
    assert store.query(_query("bicycles", similarity_top_k=2, mode="mmr"), mmr_prefetch_k=2,
                       mmr_threshold=0.0).ids == routed.ids[:2]
    assert store.query(_query("bicycles", similarity_top_k=1, mode="mmr"), mmr_prefetch_factor=1.0).ids == \
        routed.ids[:1]
    # filters apply before routing, an empty result stays empty
    none = MetadataFilters(filters=[MetadataFilter(key="country", value="zz")])
    assert store.query(_query("bicycles", mode="mmr", filters=none)).ids == []
    for bad in ({"mmr_threshold": 1.5}, {"mmr_threshold": "high"}, {"mmr_prefetch_k": 0},
                {"mmr_prefetch_factor": 0}, {"mmr_prefetch_k": 4, "mmr_prefetch_factor": 2.0}):
        with pytest.raises(InvalidArgumentError, match="mmr_"):
            store.query(_query("bicycles", mode="mmr"), **bad)


def test_mmr_through_the_index_retriever(engine):
    from llama_index.core import StorageContext, VectorStoreIndex

    texts = ["Bicycles are repaired on Tuesdays.", "Bicycles are repaired on Tuesdays!", "Rye bread is sold today."]
    index = VectorStoreIndex([TextNode(id_=f"n{i}", text=t) for i, t in enumerate(texts)],
                             storage_context=StorageContext.from_defaults(vector_store=MSAVectorStore(engine)),
                             embed_model=NoEmbedding())
    plain = index.as_retriever(similarity_top_k=2).retrieve("bicycles")
    mmr = index.as_retriever(similarity_top_k=2, vector_store_query_mode="mmr",
                             vector_store_kwargs={"mmr_threshold": 1.0}).retrieve("bicycles")
    assert [n.node.node_id for n in mmr] == [n.node.node_id for n in plain]


def test_refused_knobs_say_what_to_use(store, nodes):
    store.add(nodes)
    with pytest.raises(InvalidArgumentError, match="mmr_threshold.*vector_store_query_mode='mmr'"):
        store.query(_query(), mmr_threshold=0.5)
    with pytest.raises(InvalidArgumentError, match="mmr_prefetch_k.*'mmr' only"):
        store.query(_query(), mmr_prefetch_k=8)
    with pytest.raises(InvalidArgumentError, match="unsupported arguments"):
        store.query(_query(mode="mmr"), foo=1)
    with pytest.raises(InvalidArgumentError, match="hybrid"):
        store.query(_query(mode=VectorStoreQueryMode.HYBRID))
    with pytest.raises(InvalidArgumentError, match="alpha"):
        store.query(_query(alpha=0.5))
    with pytest.raises(InvalidArgumentError, match="unsupported arguments"):
        store.query(_query(), foo=1)
    with pytest.raises(InvalidArgumentError, match="query_str is required"):
        store.query(VectorStoreQuery(query_embedding=[0.1, 0.2], similarity_top_k=2))
    with pytest.raises(ValueError):
        store.query(_query(similarity_top_k=0))
    with pytest.raises(InvalidArgumentError, match="unsupported arguments"):
        store.add(nodes, foo=1)


def test_delete_by_ref_doc_id(store, nodes, engine):
    store.add(nodes)
    store.delete("doc-fr")
    assert sorted(n.node_id for n in store.get_nodes()) == ["n2", "n3"]
    store.delete("no-such-doc")  # nothing to delete: no error, as in LlamaIndex's stores
    assert len(engine) == 2


def test_delete_nodes_and_get_nodes(store, nodes):
    store.add(nodes)
    assert [n.node_id for n in store.get_nodes(node_ids=["n3", "n1"])] == ["n3", "n1"]
    fr = MetadataFilters(filters=[MetadataFilter(key="country", value="fr")])
    assert [n.node_id for n in store.get_nodes(filters=fr)] == ["n1"]
    store.delete_nodes(node_ids=["n1", "missing"])
    assert sorted(n.node_id for n in store.get_nodes()) == ["n2", "n3", "n4"]
    store.delete_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="year", value=2005,
                                                                       operator=FilterOperator.GTE)]))
    assert sorted(n.node_id for n in store.get_nodes()) == ["n2"]
    with pytest.raises(InvalidArgumentError, match="clear"):
        store.delete_nodes()


def test_clear(store, nodes, engine):
    store.add(nodes)
    store.clear()
    assert store.get_nodes() == [] and len(engine) == 0
    assert store.query(_query()).ids == []  # an empty store answers nothing, it does not raise


def test_async_methods(store, nodes):
    import asyncio

    async def run():
        await store.async_add(nodes)
        res = await store.aquery(_query(similarity_top_k=2))
        await store.adelete("doc-pt")
        got = await store.aget_nodes()
        await store.aclear()
        return res, got
    res, got = asyncio.run(run())
    assert len(res.ids) == 2 and sorted(n.node_id for n in got) == ["n1", "n3", "n4"]


def test_embeddings_are_not_needed_and_ignored_with_a_warning(store, nodes, caplog):
    assert NoEmbedding().get_text_embedding("anything") == []
    nodes[0].embedding = [0.1, 0.2, 0.3]
    with caplog.at_level("WARNING"):
        store.add(nodes)
    assert "ignores node embeddings" in caplog.text
    assert store.get_nodes(node_ids=["n1"])[0].embedding is None


def test_persist_and_from_persist_dir(store, nodes, engine, engine_dir, tmp_path):
    store.add(nodes)
    store.persist(str(tmp_path / "default__vector_store.json"))
    with pytest.raises(InvalidArgumentError, match="replace=True"):
        MSAVectorStore.from_persist_dir(str(tmp_path), engine)  # the engine holds documents: never replaced silently
    fresh = MSAEngine.from_pretrained(engine_dir, device="cpu")
    loaded = MSAVectorStore.from_persist_dir(str(tmp_path), fresh)
    assert loaded.collection_name == store.collection_name
    assert loaded.query(_query(similarity_top_k=2)).ids == store.query(_query(similarity_top_k=2)).ids
    with pytest.raises(FileNotFoundError):
        MSAVectorStore.from_persist_dir(str(tmp_path / "nothing"), fresh)


def test_storage_context_namespaces_persist_their_own_memories(nodes, engine_dir, tmp_path):
    """Two stores in one StorageContext (add_vector_store(namespace=...)) each persist their own memory, as
    LlamaIndex gives each namespace its own file; one saving over the other would lose a memory in silence."""
    from llama_index.core import StorageContext

    ea, eb = (MSAEngine.from_pretrained(engine_dir, device="cpu") for _ in range(2))
    a, b = MSAVectorStore(ea), MSAVectorStore(eb, collection_name="other")
    a.add(nodes[:2])
    b.add(nodes[2:])
    ctx = StorageContext.from_defaults(vector_store=a)
    ctx.add_vector_store(b, namespace="second")
    ctx.persist(str(tmp_path))
    assert {"msa_memory", "second__msa_memory"} <= set(os.listdir(tmp_path))
    fa, fb = (MSAEngine.from_pretrained(engine_dir, device="cpu") for _ in range(2))
    la = MSAVectorStore.from_persist_dir(str(tmp_path), fa)
    lb = MSAVectorStore.from_persist_dir(str(tmp_path), fb, namespace="second")
    assert fa.snapshot().ids == ["n1", "n2"] and fb.snapshot().ids == ["n3", "n4"]
    assert (la.collection_name, lb.collection_name) == ("default", "other")


def test_a_node_stored_in_parts_comes_back_once(engine_dir):
    """A node longer than the window is stored in parts, each carrying the whole node: a query returns the node
    once (at its best part) and still fills similarity_top_k with other nodes."""
    import warnings

    e = MSAEngine.from_pretrained(engine_dir, device="cpu", max_doc_tokens=15)
    store = MSAVectorStore(e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the split's own warning
        store.add([TextNode(id_="long", text="Paris is the capital of France. " * 6),
                   TextNode(id_="short", text="Alice was born in Lisbon."), TextNode(id_="fox", text="A fox.")])
    assert len(e) > 3  # "long" is in parts
    res = store.query(_query("capital of France", similarity_top_k=3))
    assert sorted(res.ids) == ["fox", "long", "short"] and [n.node_id for n in res.nodes] == res.ids
    assert len(res.similarities) == 3 and res.similarities == sorted(res.similarities, reverse=True)
    for threshold in (None, 1.0, 0.0):  # MMR picks among distinct nodes: it fills top_k too
        mmr = store.query(_query("capital of France", similarity_top_k=3, mode="mmr", mmr_threshold=threshold))
        assert sorted(mmr.ids) == ["fox", "long", "short"]
    from msa_plugins.integrations.llama_index import MSARetriever
    assert sorted(n.node.node_id for n in MSARetriever(e, similarity_top_k=3).retrieve("Paris is the capital of France. " * 2)) == \
        ["fox", "long", "short"]
    # by its node id the node is found, fetched and deleted whole, once
    assert store.query(_query("capital of France", similarity_top_k=3, node_ids=["long"])).ids == ["long"]
    assert [n.node_id for n in store.get_nodes(node_ids=["short", "long"])] == ["short", "long"]
    assert sorted(n.node_id for n in store.get_nodes()) == ["fox", "long", "short"]
    whole = store.get_nodes(node_ids=["long"])[0]
    assert whole.get_content() == "Paris is the capital of France. " * 6
    store.delete_nodes(node_ids=["long"])
    assert len(e) == 2 and sorted(n.node_id for n in store.get_nodes()) == ["fox", "short"]


def test_collections_are_isolated(engine, nodes):
    a = MSAVectorStore(engine, collection_name="tenant-a")
    b = MSAVectorStore(engine, collection_name="tenant-b")
    a.add(nodes[:2])
    b.add([_node("b1", "Ana's bank PIN is 4321.", "pins", owner="ana")])
    assert sorted(a.query(_query("What is Ana's bank PIN?")).ids) == ["n1", "n2"]
    assert b.query(_query("What is Ana's bank PIN?")).ids == ["b1"]
    assert [d.id for d in engine.retrieve("What is Ana's bank PIN?", k=4)] == []  # the default collection is empty
    b.clear()
    assert len(a.get_nodes()) == 2
    with pytest.raises(ValueError, match="b1|n1"):  # ids are unique across the memory: no silent cross-collection upsert
        b.add([_node("n1", "clash", "x")])


def test_an_empty_filter_list_restricts_nothing_as_in_simple_vector_store(store, nodes):
    """MetadataFilters(filters=[], condition="or") used to admit no node (any() of nothing); SimpleVectorStore
    reads an empty list as no filter, whatever the condition, and so does delete_nodes."""
    from llama_index.core.vector_stores import SimpleVectorStore

    store.add(nodes)
    ref = SimpleVectorStore()
    for i, n in enumerate(nodes):
        n.embedding = [1.0, float(i)]
    ref.add(nodes)
    for condition in ("and", "or", "not"):
        empty = MetadataFilters(filters=[], condition=condition)
        assert len(store.query(_query(filters=empty)).nodes) == 4
        assert len(ref.query(VectorStoreQuery(query_embedding=[1.0, 0.0], similarity_top_k=4, filters=empty)).ids) == 4
    nested = MetadataFilters(filters=[MetadataFilter(key="country", value="pt"), MetadataFilters(filters=[])],
                             condition="and")
    assert [n.node_id for n in store.query(_query(filters=nested)).nodes] == ["n2"]
    store.delete_nodes(filters=MetadataFilters(filters=[], condition="or"))
    assert store.get_nodes() == []
