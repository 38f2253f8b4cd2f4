"""Facade seams beyond answering: collections (every document belongs to one; routing sees one unless asked
for all), document vectors (MMR), tools through the chat template."""

import pytest

from msa_plugins import ALL_COLLECTIONS, DocumentNotFoundError, DuplicateIdError, InvalidArgumentError, MSAEngine

QUESTION = "What is Ana's bank PIN?"


@pytest.fixture()
def engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, k=5, max_new_tokens=2)
    e.add(["Alice was born in Lisbon.", "Paris is the capital of France."], ids=["alice", "paris"], progress=False)
    e.add(["Ana's bank PIN is 4321."], ids=["pin"], collection="store", progress=False)
    return e


def test_routing_never_crosses_collections_unless_asked(engine):
    assert {d.id for d in engine.retrieve(QUESTION)} == {"alice", "paris"}
    assert [d.id for d in engine.retrieve(QUESTION, collection="store")] == ["pin"]
    assert {d.id for d in engine.retrieve(QUESTION, collection=ALL_COLLECTIONS)} == {"alice", "paris", "pin"}
    res = engine.query(QUESTION)
    assert "pin" not in {d.id for d in res.documents} and all(d.collection == "default" for d in res.documents)
    assert [d.id for d in engine.query(QUESTION, collection="store").documents] == ["pin"]
    # a where filter applies within the collection
    assert engine.retrieve(QUESTION, where=["pin"]) == []
    assert engine.retrieve(QUESTION, where=lambda d: True, collection="nobody") == []


def test_ids_are_unique_across_collections_and_writes_stay_inside_theirs(engine):
    with pytest.raises(DuplicateIdError, match="already in the memory"):
        engine.add(["another"], ids=["pin"])
    with pytest.raises(DuplicateIdError, match="belongs to collection 'store'"):
        engine.upsert(["Ana's PIN changed."], ids=["pin"])
    with pytest.raises(DocumentNotFoundError, match="pin"):
        engine.delete(["pin"])  # not the default collection's to delete
    assert engine.delete(["pin"], missing_ok=True) == [] and "pin" in engine
    engine.upsert(["Ana's PIN is now 1111."], ids=["pin"], collection="store")
    assert engine.get(["pin"])[0].text == "Ana's PIN is now 1111."
    assert engine.delete(["pin"], collection="store") == ["pin"] and "pin" not in engine


def test_collections_survive_save_and_load(engine, tmp_path, tiny_model_dir):
    engine.save(str(tmp_path / "m"))
    loaded = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=str(tmp_path / "m"))
    snap = loaded.snapshot()
    assert snap.collections() == ["default", "store"]
    assert [d.id for d in snap.documents("store")] == ["pin"]
    assert [d.id for d in loaded.retrieve(QUESTION, collection="store")] == ["pin"]


@pytest.mark.parametrize("name,error", [("*", InvalidArgumentError), ("", InvalidArgumentError),
                                        ("a*b", InvalidArgumentError), (5, TypeError)])
def test_bad_collection_names_are_refused_and_change_nothing(engine, name, error):
    before = engine.snapshot().ids
    with pytest.raises(error, match="collection"):
        engine.add(["text"], ids=["x"], collection=name)
    assert engine.snapshot().ids == before


def test_document_vectors_are_unit_rows_and_follow_the_routing_keys(engine):
    import torch

    vecs = engine.document_vectors(["alice", "paris", "pin"])
    assert vecs.shape[0] == 3 and torch.allclose(vecs.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(engine.document_vectors(["paris"])[0], vecs[1])
    assert not torch.allclose(vecs[0], vecs[1])
    with pytest.raises(DocumentNotFoundError, match="nobody"):
        engine.document_vectors(["nobody"])


def test_tools_go_to_a_template_that_renders_them_and_are_refused_otherwise(engine):
    from msa_plugins import InvalidArgumentError as Bad

    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    tok = engine.model.tokenizer
    plain = tok.chat_template
    assert not engine.supports_tools  # the tiny models' ChatML template has no tools block
    with pytest.raises(Bad, match="does not render tools"):
        engine.generate("weather?", tools=[tool], max_new_tokens=1)
    try:  # a template with a tools block (as Qwen2/Qwen3 have) gets the schemas in the prompt
        tok.chat_template = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}" + plain
        assert engine.supports_tools
        with_tools = engine.generate("weather?", tools=[tool], max_new_tokens=1)
        without = engine.generate("weather?", max_new_tokens=1)
        assert with_tools.prompt_tokens > without.prompt_tokens
    finally:
        tok.chat_template = plain
