"""MemoryBank through the engine: persistence, delete, add-after-load, crash safety, long documents, and bad
input that changes nothing. Storage details (locks, checksums, damaged files) are in test_storage.py."""

import json
import os

import warnings

import pytest
import torch

from msa_plugins import MSAEngine
from msa_plugins.errors import (DocumentNotFoundError, DuplicateIdError, InvalidArgumentError, MemoryFormatError,
                               ModelMismatchError)

DOCS = ["Paris is the capital of France.", "Alice was born in Lisbon and works as a painter.",
        "The quick brown fox jumps over the lazy dog.", "Berlin is the capital of Germany."]
Q = "Where was Alice born?"


@pytest.fixture
def engine(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    e.add(DOCS, ids=["paris", "alice", "fox", "berlin"], metadata=[{"topic": "geo"}, {"topic": "people"}, {}, {"topic": "geo"}])
    return e


def bank(e):
    return e._bank  # below the facade: these tests look at the stored tensors


def snapshot(e):
    s = bank(e).state
    return (s.ids, s.texts, s.metadata, s.keys_r.clone(), s.keys.clone(), s.values.clone(), s.chunk_doc.clone())


def assert_same(a, b):
    assert a[:3] == b[:3]
    for x, y in zip(a[3:], b[3:]):
        assert torch.equal(x, y)


def test_add_get_len_nbytes_metadata(engine):
    assert len(engine) == 4
    d = engine.get(["alice"])[0]
    assert d.text == DOCS[1] and d.metadata == {"topic": "people"} and d.n_tokens > 0
    s = bank(engine).state
    L, G, D = len(engine.routing_layers), engine.model.n_kv_heads, engine.model.head_dim
    assert s.keys_r.shape == (L, s.n_chunks, G * D)
    assert engine.snapshot().nbytes == 3 * s.keys_r.numel() * 4


def test_save_load_round_trip_same_answers_and_memory_mapped(engine, tiny_model_dir, tmp_path):
    before = engine.query(Q, mode="sparse", max_new_tokens=6)
    engine.save(tmp_path)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=str(tmp_path))
    assert_same(snapshot(engine), snapshot(e2))
    after = e2.query(Q, mode="sparse", max_new_tokens=6)
    assert after.answer == before.answer
    assert [d.id for d in after.documents] == [d.id for d in before.documents]
    assert e2.get(["paris"])[0].metadata == {"topic": "geo"}
    # the loaded tensors are views of a memory map, not copies
    import numpy as np
    assert isinstance(bank(e2).state.keys.numpy().base, np.memmap) or bank(e2).state.keys.numpy().base is not None


def test_delete_is_never_routed_again_and_add_after_load(engine, tiny_model_dir, tmp_path):
    engine.delete(["alice"])
    assert "alice" not in engine.snapshot()
    for k in (1, 3, 10):
        r = engine.route(Q, k=k)
        assert "alice" not in r.ids and all("alice" not in v[0] for v in r.per_layer.values())
    res = engine.query(Q, mode="sparse", k=10, max_new_tokens=2)
    assert "alice" not in [d.id for d in res.documents]
    engine.save(tmp_path)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=str(tmp_path))
    e2.add(["A new document about Lisbon."], ids=["new"])
    assert len(e2) == 4 and "new" in e2.route(Q, k=10).ids
    # a re-added document gets the same keys as the original encoding
    e2.add([DOCS[1]], ids=["alice"])
    s2 = bank(e2).state
    a = s2.chunk_range(s2.row_of["alice"])
    fresh = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    fresh.add([DOCS[1]], ids=["alice"])
    torch.testing.assert_close(s2.keys_r[:, a[0]:a[1]], bank(fresh).state.keys_r, atol=1e-5, rtol=1e-5)


def test_crash_mid_save_leaves_previous_copy_loadable(engine, tiny_model_dir, tmp_path, monkeypatch):
    engine.save(tmp_path)
    old = snapshot(engine)
    engine.add(["Another document."], ids=["extra"])
    real_replace = os.replace

    def crash(src, dst):  # the process dies after the new files are written, before the manifest commit
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        engine.save(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=str(tmp_path))
    assert_same(old, snapshot(e2))
    engine.save(tmp_path)  # the next save succeeds and clears the crashed generation's files
    assert len([f for f in os.listdir(tmp_path) if f.startswith("tensors-")]) == 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".msa-tmp-")]


def test_bad_input_leaves_bank_unchanged(engine):
    before = snapshot(engine)
    bad_calls = [
        (lambda: engine.add(["ok", "   "]), ValueError, "empty"),
        (lambda: engine.add(["ok", 3]), TypeError, "not a str"),
        (lambda: engine.add("a single string"), TypeError, "list of strings"),
        (lambda: engine.add(["x", "y"], ids=["a", "a"]), ValueError, "duplicate"),
        (lambda: engine.add(["x"], ids=["alice"]), DuplicateIdError, "already in the memory"),
        (lambda: engine.add(["x"], ids=["a#0"]), InvalidArgumentError, "'#'"),
        (lambda: engine.add(["x"], metadata=[{1: "int key"}]), TypeError, "not a str"),
        (lambda: engine.add(["x"], metadata=[{"t": (1, 2)}]), TypeError, "tuple"),
        (lambda: engine.add(["x"], metadata=[{"f": float("nan")}]), TypeError, "does not survive saving"),
        (lambda: engine.upsert(["x"], ids=None), ValueError, "needs the ids"),
        (lambda: engine.delete(["nope"]), DocumentNotFoundError, "unknown"),
        (lambda: engine.add(["x"], metadata=[{"f": object()}]), TypeError, "does not survive saving"),
        (lambda: engine.add(["x", "y"], ids=["only-one"]), ValueError, "ids"),
        (lambda: engine.delete(["alice", "nope"]), KeyError, "unknown"),
        (lambda: engine.get(["nope"]), KeyError, "unknown"),
        (lambda: engine.query("   "), ValueError, "empty"),
        (lambda: engine.query(None), TypeError, "str"),
    ]
    for call, exc, words in bad_calls:
        with pytest.raises(exc, match=words):
            call()
        assert_same(before, snapshot(engine))


def test_asking_an_empty_memory(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    with pytest.raises(LookupError, match="empty"):
        e.route(Q)
    assert e.retrieve(Q) == []
    assert e.query(Q, max_new_tokens=2).documents == []  # answered from the model alone


def test_empty_add_and_delete_return_what_changed(engine):
    before = snapshot(engine)
    assert engine.add([]) == [] and engine.add([], ids=[], metadata=[]) == []
    assert engine.delete(["nope"], missing_ok=True) == []
    assert_same(before, snapshot(engine))
    assert engine.delete(["fox", "nope", "fox"], missing_ok=True) == ["fox"]
    assert "fox" not in engine.snapshot() and len(engine) == 3


def test_texts_and_ids_from_iterators_and_dict_views_pair_as_given(engine):
    """upsert used to check a generator of texts, using it up, then find 0 texts to pair with the ids."""
    engine.upsert((t for t in ["Paris is in France, on the Seine."]), ids=(i for i in ["paris"]))
    assert engine.get(["paris"])[0].text == "Paris is in France, on the Seine."
    by_id = {"rome": "Rome is the capital of Italy.", "oslo": "Oslo is the capital of Norway."}
    engine.add(by_id.values(), ids=by_id.keys())  # a dict's views keep its order: accepted, and paired
    assert [d.text for d in engine.get(["rome", "oslo"])] == list(by_id.values())


def test_parent_id_in_metadata_does_not_group_documents(engine, tiny_model_dir, tmp_path):
    """Only a real split records a parent: a caller's metadata parent_id is just metadata."""
    engine.add(["A forged part.", "Another forged part."], ids=["f0", "f1"],
               metadata=[{"parent_id": "paris", "part": 0}, {"parent_id": "ghost", "part": 1}])
    assert [d.id for d in engine.get(["paris"])] == ["paris"]
    assert "ghost" not in engine.snapshot()
    engine.save(tmp_path)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=str(tmp_path))
    assert "ghost" not in e2.snapshot() and [d.id for d in e2.get(["paris"])] == ["paris"]
    assert e2.delete(["paris"]) == ["paris"] and "f0" in e2.snapshot()


def test_other_model_or_settings_refused(engine, tiny_model_dir, tmp_path):
    engine.save(tmp_path)
    other = MSAEngine.from_pretrained(tiny_model_dir("qwen3"), device="cpu", chunk_size=4)
    with pytest.raises(ModelMismatchError, match="different model"):
        other.load(str(tmp_path))
    other_p = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=8)
    with pytest.raises(ModelMismatchError, match="chunk_size"):
        other_p.load(str(tmp_path))
    assert len(other_p) == 0


def test_truncated_or_tampered_files_fail_clearly(engine, tiny_model_dir, tmp_path):
    engine.save(tmp_path)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    manifest = tmp_path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(MemoryFormatError, match="truncated"):
        e2.load(str(tmp_path))
    m = json.loads(good)
    m["n_documents"] = 99
    manifest.write_text(json.dumps(m))
    with pytest.raises(MemoryFormatError, match="manifest"):
        e2.load(str(tmp_path))
    manifest.write_text(good)
    docs = tmp_path / m["documents"]["file"]
    docs.write_text(docs.read_text().replace("Lisbon", "Madrid"))
    with pytest.raises(MemoryFormatError, match="checksum"):
        e2.load(str(tmp_path))
    with pytest.raises(MemoryFormatError, match="no saved memory"):
        e2.load(str(tmp_path / "nowhere"))
    manifest.write_text(json.dumps({**json.loads(good), "format_version": 1}))  # a memory in the first format (before per-file checksums)
    with pytest.raises(MemoryFormatError, match="older msa-plugins.*re-ingest"):
        e2.load(str(tmp_path))
    assert len(e2) == 0


def test_long_documents_are_split_with_parent_id(tiny_model_dir, tmp_path):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, max_doc_tokens=16)
    long_text = " ".join(["Paris is the capital of France."] * 10)
    n_tok = e.count_tokens(long_text)
    with pytest.warns(UserWarning, match="parent_id"):
        ids = e.add([long_text, "A short one."], ids=["long", "short"])
    assert ids == ["long", "short"]  # one id per text; the parent id names the whole document
    parts = e.get(["long"])
    assert len(parts) == -(-n_tok // 16) and len(e) == len(parts) + 1
    assert [d.id for d in parts] == [f"long#{i}" for i in range(len(parts))]
    assert all(d.metadata["parent_id"] == "long" for d in parts)
    assert sum(d.n_tokens for d in parts) == n_tok  # nothing cut
    assert "long" in e.snapshot() and "long#0" in e.snapshot()
    with pytest.raises(DuplicateIdError, match="already in the memory"):
        e.add(["again"], ids=["long"])
    e.upsert([long_text + " One more sentence."], ids=["long"])  # replaces every part at once
    assert len(e.get(["long"])) == -(-e.count_tokens(long_text + " One more sentence.") // 16)
    with pytest.raises(InvalidArgumentError, match="one part of the split long text 'long'"):
        e.delete(["long#0"])  # alone it would leave 'long' cut short, still answering to its id
    assert [d.id for d in e.get(["long"])] == [f"long#{i}" for i in range(len(e.get(["long"])))]
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, max_doc_tokens=16)
    with pytest.warns(UserWarning):
        e2.add([long_text, "A short one."], ids=["long", "short"])
    parts = [d.id for d in e2.get(["long"])]
    assert e2.delete(parts) == parts  # every part at once: the whole text, as a vector store's delete asks
    assert e2.snapshot().ids == ["short"]
    e.save(tmp_path)  # the parts stay grouped across save and load
    e.load(str(tmp_path))
    assert [d.id for d in e.get(["long"])] == [f"long#{i}" for i in range(len(e.get(["long"])))]
    assert e.delete(["long"]) == ["long"]  # deletes every part
    assert len(e) == 1 and "long" not in e.snapshot()
    assert all(not i.startswith("long") for i in e.route("capital of France", k=10).ids)
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", max_doc_tokens=16, split_long_documents=False)
    with pytest.raises(ValueError, match="window"):
        e2.add([long_text])
    assert len(e2) == 0


def test_split_parts_join_to_the_text_given_and_keep_the_callers_metadata(tiny_model_dir):
    """A part boundary inside a multi-byte character (byte-level tokens) used to decode each half to U+FFFD: the
    memory then held, and gave back, a text the user never wrote. Parts are now exact pieces of the text."""
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, max_doc_tokens=15)
    text = "Tokyo 東京 is big. Café crème brûlée 😀😀 résumé naïve. " * 3
    with pytest.warns(UserWarning, match="parent_id"):
        e.add([text], ids=["long"], metadata=[{"src": "a"}])
    parts = e.get(["long"])
    assert len(parts) > 2 and "".join(d.text for d in parts) == text
    assert "\ufffd" not in "".join(d.text for d in parts)
    assert all(d.n_tokens <= 15 for d in parts) and sum(d.n_tokens for d in parts) == e.count_tokens(text)
    assert all(d.metadata == {"src": "a", "parent_id": "long", "part": i} for i, d in enumerate(parts))
    before = e.snapshot().ids
    for meta in ({"parent_id": "my-own"}, {"part": "intro"}):  # the parts' own keys would overwrite the caller's
        with pytest.raises(InvalidArgumentError, match="rename those keys"):
            e.add([text], ids=["other"], metadata=[meta])
    assert e.snapshot().ids == before  # refused before anything changed
    e.add(["short"], ids=["s"], metadata=[{"parent_id": "my-own", "part": "intro"}])  # an unsplit text keeps them
    assert e.get(["s"])[0].metadata == {"parent_id": "my-own", "part": "intro"}


def test_retrieve_whole_texts_counts_a_long_text_once(tiny_model_dir):
    """whole_texts=True: k distinct texts (a text stored in parts once, at its best part), routing deeper as
    needed; `whole_id` names the text a part belongs to."""
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", max_doc_tokens=15)
    q = "Paris is the capital of France. Paris is the capital of France."
    with pytest.warns(UserWarning, match="parent_id"):
        e.add(["Paris is the capital of France. " * 12, "Rome is in Italy.", "Oslo is cold."], ids=["long", "r", "o"])
    parts = e.retrieve(q, k=len(e))
    whole = e.retrieve(q, k=3, whole_texts=True)
    assert sorted(d.whole_id for d in whole) == ["long", "o", "r"]
    first = {}
    for d in parts:
        first.setdefault(d.whole_id, d.id)
    assert [d.id for d in whole] == list(first.values())  # each text at its best-routed part, in routing order
    assert [d.id for d in e.retrieve(q, k=2, whole_texts=True)] == list(first.values())[:2]
    assert len(e.retrieve(q, k=10, whole_texts=True)) == 3  # the memory runs out: no endless deepening
    assert e.get(["long"])[0].whole_id == "long" and e.get(["r"])[0].whole_id == "r"


def _split(tokenize, detokenize, text, window):
    from msa_plugins.engine.ingest import Ingestor

    ingest = Ingestor(tokenize, detokenize, encode=None, max_doc_tokens=window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the split's own warning
        return ingest.prepare([text], ids=["long"]).documents


def test_splitting_a_long_text_decodes_each_token_a_bounded_number_of_times(tiny_model_dir):
    """Splitting decoded the whole prefix at every cut (quadratic: a 118K-token text took 7.5 s inside the
    writer lock); each cut now decodes its own piece after a few tokens of context."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    decoded = []

    def detokenize(ids):
        decoded.append(len(ids))
        return tok.decode(ids)

    text = "Tokyo 東京 is big. Café crème brûlée 😀 résumé. " * 150
    toks = tok(text, add_special_tokens=False)["input_ids"]
    parts = _split(lambda t: tok(t, add_special_tokens=False)["input_ids"], detokenize, text, 15)
    assert "".join(d.text for d in parts) == text and all(tok.decode(d.tokens) == d.text for d in parts)
    assert sum(decoded) < 12 * len(toks)  # whole-prefix decoding: ~len(toks)**2 / (2 * 15), about 70x this


def test_a_sentencepiece_style_decoder_keeps_parts_exact():
    """A SentencePiece (Metaspace) decoder drops the leading space of the first token it decodes: a part decoded
    on its own loses the space between it and the previous part. Parts are still exact pieces of the text."""
    words = ("the quick brown fox jumps over a lazy dog " * 20).split()
    text = " ".join(words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys("▁" + w for w in words))}
    inverse = {i: w for w, i in vocab.items()}

    def detokenize(ids):  # Metaspace: "▁" -> " ", then the leading space of the text is dropped
        return "".join(inverse[i] for i in ids).replace("▁", " ")[1:]

    parts = _split(lambda t: [vocab["▁" + w] for w in t.split()], detokenize, text, 7)
    assert len(parts) > 10 and "".join(d.text for d in parts) == text
    assert all(d.text.startswith(" ") for d in parts[1:])  # each part keeps the space that begins it


def test_replace_swaps_in_one_step_and_failed_replace_changes_nothing(engine):
    before = snapshot(engine)
    with pytest.raises(ValueError, match="empty"):
        engine.upsert(["new text", " "], ids=["alice", "extra"])
    assert_same(before, snapshot(engine))
    engine.upsert(["Alice now lives in Porto."], ids=["alice"], metadata=[{"topic": "moved"}])
    assert len(engine) == 4 and engine.get(["alice"])[0].text == "Alice now lives in Porto."
    assert engine.get(["alice"])[0].metadata == {"topic": "moved"}


def test_stop_sequences_end_generation_and_early_exit_still_reports_usage(tiny_model_dir):
    e = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu")
    e.add(DOCS)
    full = e.query(Q, max_new_tokens=12, k=2)
    assert len(full.answer) > 3
    stop = full.answer[2:4]
    cut = e.query(Q, max_new_tokens=12, k=2, stop=[stop])
    assert stop not in cut.answer and full.answer.startswith(cut.answer)
    assert cut.completion_tokens <= full.completion_tokens
    s = e.stream(Q, max_new_tokens=12, k=2)
    for _ in s:
        break
    assert s.result is not None and s.result.completion_tokens >= 1


def test_int8_routing_keys_route_like_float_keys_and_persist(tiny_model_dir, tmp_path):
    texts = DOCS + [f"Document number {i} talks about topic {i * 7 % 11}." for i in range(20)]
    questions = [Q, "What is the capital of France?", "Which document talks about topic 3?"]
    f = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    q8 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, int8_routing_keys=True)
    for e in (f, q8):
        e.add(texts, ids=[f"d{i}" for i in range(len(texts))])
    s8 = bank(q8).state
    assert s8.keys_r.dtype == torch.int8
    assert s8.keys_r_scale.shape == s8.keys_r.shape[:2] + (q8.model.n_kv_heads,)
    overlap = [len(set(f.route(q, k=5).ids) & set(q8.route(q, k=5).ids)) / 5 for q in questions]
    assert sum(overlap) / len(overlap) >= 0.8
    for q in questions:  # scores stay close to the float scores
        a, b = f.route(q, k=len(texts)), q8.route(q, k=len(texts))
        fs = dict(zip(a.ids, a.scores))
        assert max(abs(fs[d] - s) for d, s in zip(b.ids, b.scores)) < 0.02
    q8.save(str(tmp_path))
    back = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, int8_routing_keys=True,
                                     memory=str(tmp_path))
    assert back.route(Q, k=5).ids == q8.route(Q, k=5).ids
    with pytest.raises(ModelMismatchError, match="routing_keys"):
        f.load(str(tmp_path))


def test_tensor_files_from_another_memory_are_refused(engine, tiny_model_dir, tmp_path):
    engine.save(tmp_path / "a")
    other = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    other.add(["Only one document here."], ids=["one"])
    other.save(tmp_path / "b")
    ma = json.loads((tmp_path / "a" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "b" / "manifest.json").read_text())
    # swap in b's tensors under a's manifest (size field updated, as a careless copy would leave it)
    os.replace(tmp_path / "b" / mb["tensors"]["file"], tmp_path / "a" / ma["tensors"]["file"])
    ma["tensors"]["bytes"] = os.path.getsize(tmp_path / "a" / ma["tensors"]["file"])
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(ma))
    e2 = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4)
    with pytest.raises(MemoryFormatError):
        e2.load(str(tmp_path / "a"))
    assert len(e2) == 0


def test_two_engines_read_modify_write_one_folder_lose_nothing(tiny_model_dir, tmp_path):
    """Two writers (threads, each its own engine) add to one saved folder through the bank's lock:
    lock, re-read, add, save. Every acknowledged document is there at the end."""
    import threading

    d = str(tmp_path / "m")
    engines = [MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4) for _ in range(2)]
    engines[0].save(d)  # an empty memory: every round starts by loading the folder
    acked, errors = [], []

    def writer(w, e):
        try:
            for i in range(3):
                with bank(e).locked(d) as held:
                    assert held.holds_memory
                    e.load(d)
                    e.add([f"Writer {w} wrote document {i}."], ids=[f"w{w}-{i}"], progress=False)
                    bank(e).save(d, lock=held)
                acked.append(f"w{w}-{i}")
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w, e)) for w, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = MSAEngine.from_pretrained(tiny_model_dir("llama"), device="cpu", chunk_size=4, memory=d)
    assert sorted(final.snapshot().ids) == sorted(acked) and len(acked) == 6


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")  # what a full disk makes storage.save raise


def test_saving_to_keeps_the_memory_and_the_folder_together(engine, tmp_path, monkeypatch):
    """A change made under `saving_to` is saved, or (when the save or the change fails) not kept: the live memory
    never drifts from its folder, so a client told 'failed' is right after a restart too."""
    from msa_plugins.engine import storage

    folder = str(tmp_path / "mem")
    with engine.saving_to(folder):
        engine.add(["Oslo is the capital of Norway."], ids=["oslo"])
    before = snapshot(engine)
    with monkeypatch.context() as m:
        m.setattr(storage, "save", _disk_full)
        with pytest.raises(OSError, match="No space"):
            with engine.saving_to(folder):
                engine.add(["Bob lives in Oslo."], ids=["bob"])
                engine.delete(["paris"])
    assert_same(snapshot(engine), before)  # both changes undone
    with pytest.raises(DuplicateIdError):
        with engine.saving_to(folder):
            engine.delete(["fox"])
            engine.add(["again"], ids=["alice"])  # the block itself fails: the delete before it is undone too
    assert_same(snapshot(engine), before)
    reloaded = MSAEngine(engine.model, config=engine.config, name=engine.name)
    reloaded.load(folder)
    assert reloaded.snapshot().ids == engine.snapshot().ids  # the folder holds the last good copy
    with engine.saving_to(folder):  # the disk has room again: the same change goes through
        engine.add(["Bob lives in Oslo."], ids=["bob"])
    reloaded.load(folder)
    assert "bob" in reloaded and "bob" in engine
    # after the commit point the save has happened: a failing clean-up (the previous generation's files still
    # open elsewhere, say) is logged, and must not roll the memory back while the folder holds the change
    with monkeypatch.context() as m:
        with engine.saving_to(folder):
            engine.add(["Carol lives in Bergen."], ids=["carol"])
            m.setattr(storage, "clean_orphans", _permission_denied)
    reloaded.load(folder)
    assert "carol" in engine and "carol" in reloaded
    # not even an interrupt (Ctrl-C) while cleaning up: it reaches the caller, and the memory still holds what
    # the folder holds
    with monkeypatch.context() as m:
        with pytest.raises(KeyboardInterrupt):
            with engine.saving_to(folder):
                engine.delete(["carol"])
                m.setattr(storage, "clean_orphans", _interrupted)
    reloaded.load(folder)
    assert "carol" not in engine and "carol" not in reloaded
    # a load (or re-keying) inside the block changes settings the revert could not put back: refused
    before = snapshot(engine)
    with pytest.raises(InvalidArgumentError, match="saving_to"):
        with engine.saving_to(folder):
            engine.load(folder)
    assert_same(snapshot(engine), before)


def _interrupted(directory):
    raise KeyboardInterrupt


def _permission_denied(directory):
    raise PermissionError(13, "Permission denied", directory)


def test_documents_handed_out_share_no_metadata_with_the_memory(engine, tmp_path):
    """A caller annotating a returned document's nested metadata (a list of tags) must not edit the memory, an
    older snapshot (which 'later writes do not change') or the next save."""
    engine.add(["Lisbon is the capital of Portugal."], ids=["lisbon"], metadata=[{"tags": ["geo"], "a": {"b": 1}}])
    snap = engine.snapshot()
    handed = [engine.get(["lisbon"])[0], snap.get(["lisbon"])[0],
              next(d for d in engine.retrieve("capital of Portugal", k=5) if d.id == "lisbon")]
    for d in handed:
        d.metadata["tags"].append("edited")
        d.metadata["a"]["b"] = 2
    engine.save(str(tmp_path))
    reloaded = MSAEngine(engine.model, config=engine.config, name=engine.name)
    reloaded.load(str(tmp_path))
    for source in (engine, snap, reloaded):
        assert source.get(["lisbon"])[0].metadata == {"tags": ["geo"], "a": {"b": 1}}
