"""Memory folder storage (engine/storage.py): the writer lock, what a save may delete, crashed saves,
checksums and structural checks on load, damaged manifests and headers.

Most tests store synthetic tensors of the real layout directly (no model needed: storage never looks
inside the numbers); the lock across processes runs a second Python process.
"""

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from msa_plugins.engine import storage
from msa_plugins.errors import InvalidArgumentError, MemoryFormatError, MemoryLockedError, ModelMismatchError

L, GD = 2, 8  # routing layers, G*D
FP = {"model": "synthetic", "chunk_size": 4, "routing_layers": [2, 3]}


def make_memory(n_docs: int = 3, chunks=None, seed: int = 0, prefix: str = "d"):
    """(tensors, docs) of a memory with `n_docs` documents of `chunks[i]` chunks each."""
    g = torch.Generator().manual_seed(seed)
    chunks = chunks or [1 + i % 3 for i in range(n_docs)]
    counts = torch.tensor(chunks, dtype=torch.long)
    c = int(counts.sum())
    tensors = {"doc_start": torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]),
               "chunk_doc": torch.repeat_interleave(torch.arange(n_docs), counts),
               "keys_r": torch.randn(L, c, GD, generator=g), "keys": torch.randn(L, c, GD, generator=g),
               "values": torch.randn(L, c, GD, generator=g)}
    docs = [{"id": f"{prefix}{i}", "text": f"text {i}", "metadata": {"i": i}, "n_tokens": 4 * chunks[i], "parent": None}
            for i in range(n_docs)]
    return tensors, docs


def save(d, n_docs=3, **kw):
    tensors, docs = make_memory(n_docs, **kw)
    return storage.save(str(d), tensors, docs, FP)


def rewrite_manifest(d, **changes):
    path = os.path.join(d, storage.MANIFEST)
    m = json.load(open(path))
    m.update(changes)
    with open(path, "w") as f:
        json.dump(m, f)
    return m


def reseal(d, tensors):
    """Rewrite the tensors file with `tensors` and update its size and checksum in the manifest, as a
    careful forger would: only the structural checks can catch what is wrong inside."""
    m = storage.read_manifest(str(d))
    path = os.path.join(d, m["tensors"]["file"])
    os.remove(path)
    nbytes, sha = storage.write_safetensors(path, tensors)
    rewrite_manifest(d, tensors={"file": m["tensors"]["file"], "bytes": nbytes, "sha256": sha})


def test_round_trip_memory_mapped_and_standard_safetensors(tmp_path):
    tensors, docs = make_memory(4)
    tensors["keys_r"] = tensors["keys_r"].to(torch.bfloat16)
    m = storage.save(str(tmp_path), tensors, docs, FP)
    back = storage.load(str(tmp_path), FP)
    assert back.docs == docs and back.manifest["generation"] == m["generation"]
    for k, v in tensors.items():
        assert torch.equal(back.tensors[k], v), k
    assert back.tensors["keys"].numpy().base is not None  # a view of the memory map, not a copy
    from safetensors.torch import load_file  # the file is standard safetensors
    std = load_file(os.path.join(tmp_path, m["tensors"]["file"]))
    assert all(torch.equal(std[k], v) for k, v in tensors.items())


def test_one_file_mode_for_all_memory_files(tmp_path):
    save(tmp_path)
    save(tmp_path, n_docs=2)
    modes = {n: os.stat(tmp_path / n).st_mode & 0o777 for n in os.listdir(tmp_path) if n != storage.LOCK_FILE}
    assert len(modes) == 3 and len(set(modes.values())) == 1, modes
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o644 & ~umask}


# ------------------------------------------------------------------ 2: never delete the user's files
def test_save_keeps_files_it_does_not_own(tmp_path):
    save(tmp_path)
    planted = ["docs-2024-budget.md", "tensors-notes.safetensors", ".manifest.json.bak", "docs-0123.jsonl",
               ".msa-tmp-notes.txt", "notes.txt"]
    for name in planted:
        (tmp_path / name).write_text("the user's own file")
    save(tmp_path, n_docs=2)
    save(tmp_path, n_docs=5)
    for name in planted:
        assert (tmp_path / name).read_text() == "the user's own file"
    m = storage.read_manifest(str(tmp_path))
    owned = {storage.MANIFEST, storage.LOCK_FILE, m["tensors"]["file"], m["documents"]["file"]}
    assert set(os.listdir(tmp_path)) == owned | set(planted)  # and the old generations are gone
    assert len(storage.load(str(tmp_path), FP).docs) == 5


def test_a_folder_under_an_owned_name_neither_blocks_saves_nor_is_deleted(tmp_path, caplog):
    """Saves write files only; a folder named like a crashed save's temp or data file is not one (it may hold
    someone's files). It used to make every later save fail (IsADirectoryError while cleaning leftovers)."""
    save(tmp_path)
    planted = [tmp_path / ".msa-tmp-0123456789abcdef-docs.jsonl", tmp_path / "tensors-0123456789abcdef.safetensors"]
    for folder in planted:
        folder.mkdir()
        (folder / "keep.txt").write_text("the user's own file")
    with caplog.at_level("WARNING"):
        save(tmp_path, n_docs=3)
    assert len(storage.load(str(tmp_path), FP).docs) == 3
    assert all((folder / "keep.txt").read_text() == "the user's own file" for folder in planted)
    assert "left in place" in caplog.text


def test_a_folder_or_link_under_the_lock_or_manifest_name_is_refused_before_anything_is_written(tmp_path):
    """A folder named manifest.json used to fail the save only at its last step, after the new data files had
    their final names (a full generation left per retry, and load said the manifest was 'missing'); a lock
    file that is a link made the lock create its target outside the folder."""
    for name in (storage.MANIFEST, storage.LOCK_FILE):
        d = tmp_path / f"planted{name}"
        save(d)
        os.remove(d / name)
        (d / name).mkdir()
        before = sorted(os.listdir(d))
        for _ in range(2):
            with pytest.raises(MemoryFormatError, match="is a folder where the memory keeps a file"):
                save(d, n_docs=2)
        assert sorted(os.listdir(d)) == before and os.listdir(d / name) == []
    with pytest.raises(MemoryFormatError, match="manifest.json is a folder, not a file"):
        storage.load(str(tmp_path / f"planted{storage.MANIFEST}"))
    d, outside = tmp_path / "linked", tmp_path / "outside-lock"
    save(d)
    os.remove(d / storage.LOCK_FILE)
    os.symlink(outside, d / storage.LOCK_FILE)
    with pytest.raises(MemoryFormatError, match="symbolic link"):
        save(d, n_docs=2)
    assert not outside.exists() and len(storage.load(str(d), FP).docs) == 3


def test_a_dangling_link_under_a_previous_data_file_name_is_removed_as_a_link(tmp_path):
    save(tmp_path)
    m = storage.read_manifest(str(tmp_path))
    os.remove(tmp_path / m["tensors"]["file"])
    os.symlink(tmp_path / "nowhere", tmp_path / m["tensors"]["file"])
    save(tmp_path, n_docs=2)  # the previous generation's names are removed, the dangling link with them
    assert not os.path.lexists(tmp_path / m["tensors"]["file"])
    assert len(storage.load(str(tmp_path), FP).docs) == 2


def test_a_manifest_entry_that_is_not_finite_json_is_refused_before_anything_is_written(tmp_path):
    save(tmp_path)
    before = sorted(os.listdir(tmp_path))
    tensors, docs = make_memory(2)
    with pytest.raises(InvalidArgumentError, match="not finite JSON"):
        storage.save(str(tmp_path), tensors, docs, FP, extra={"calibration": {"threshold": float("inf")}})
    assert sorted(os.listdir(tmp_path)) == before and len(storage.load(str(tmp_path), FP).docs) == 3


def test_save_refuses_a_folder_that_is_not_a_memory(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "docs-2024-budget.md").write_text("budget")
    with pytest.raises(InvalidArgumentError, match="not empty.*holds no saved memory"):
        save(notes)
    assert os.listdir(notes) == ["docs-2024-budget.md"]  # not even a lock file was created
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InvalidArgumentError, match="is a file"):
        save(tmp_path / "afile")
    save(tmp_path / "new" / "deep")  # a missing folder is created
    assert len(storage.load(str(tmp_path / "new" / "deep")).docs) == 3


# ------------------------------------------------------------------ 5: crashed saves leave nothing behind
@pytest.mark.parametrize("crash_at", ["write_jsonl", "rename1", "rename2", "replace", "clean"])
def test_crash_at_any_step_keeps_the_old_memory_and_the_next_save_cleans(tmp_path, monkeypatch, crash_at):
    save(tmp_path, n_docs=2, seed=1)
    before = storage.load(str(tmp_path), FP)
    (tmp_path / "docs-2024-budget.md").write_text("mine")
    calls = {"rename": 0}
    real_rename, real_replace, real_clean = os.rename, os.replace, storage.clean_orphans

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated kill")

    def rename(src, dst):
        calls["rename"] += 1
        if crash_at == f"rename{calls['rename']}":
            crash()
        return real_rename(src, dst)

    if crash_at == "write_jsonl":
        monkeypatch.setattr(storage, "write_jsonl", crash)
    monkeypatch.setattr(os, "rename", rename)
    if crash_at == "replace":
        monkeypatch.setattr(os, "replace", crash)
    if crash_at == "clean":  # killed after the commit, before the old generation was removed
        monkeypatch.setattr(storage, "clean_orphans", lambda d: crash() if calls["rename"] == 2 else real_clean(d))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, n_docs=4, seed=2)
    monkeypatch.undo()
    after = storage.load(str(tmp_path), FP)
    assert len(after.docs) == (4 if crash_at == "clean" else 2)  # committed or not, never half
    if crash_at != "clean":
        assert after.docs == before.docs
    with storage.folder_lock(str(tmp_path)):  # taking the lock (or the next save) removes the leftovers
        pass
    m = storage.read_manifest(str(tmp_path))
    assert set(os.listdir(tmp_path)) == {storage.MANIFEST, storage.LOCK_FILE, m["tensors"]["file"],
                                         m["documents"]["file"], "docs-2024-budget.md"}


def test_a_routine_save_does_not_report_a_crash_and_a_crashed_one_does(tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="msa_plugins")
    save(tmp_path, n_docs=2, seed=1)
    save(tmp_path, n_docs=3, seed=2)  # removes the generation it replaced: routine
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "interrupted" in r.getMessage()]
    assert any("previous generation" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, n_docs=4, seed=3)
    monkeypatch.undo()
    caplog.clear()
    with storage.folder_lock(str(tmp_path)):
        pass
    assert [r for r in caplog.records if r.levelno == logging.INFO and "interrupted save" in r.getMessage()]


def test_crash_during_the_first_save_leaves_a_folder_the_next_save_accepts(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path)
    monkeypatch.undo()
    with pytest.raises(MemoryFormatError, match="no saved memory"):
        storage.load(str(tmp_path))
    save(tmp_path, n_docs=2)
    assert len([n for n in os.listdir(tmp_path) if not n.startswith(".")]) == 3


# ------------------------------------------------------------------ 1: one writer at a time
def test_second_writer_thread_waits_then_fails_clearly(tmp_path):
    save(tmp_path)
    held, release = threading.Event(), threading.Event()

    def holder():
        with storage.folder_lock(str(tmp_path)):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    t0 = time.monotonic()
    with pytest.raises(MemoryLockedError, match="being written"):
        storage.save(str(tmp_path), *make_memory(1), FP, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    release.set()
    t.join()
    assert len(storage.load(str(tmp_path)).docs) == 3  # the refused writer changed nothing
    save(tmp_path, n_docs=1)  # and the lock is free again


def test_lock_is_reentrant_in_its_thread(tmp_path):
    with storage.folder_lock(str(tmp_path)) as held:
        assert not held.holds_memory
        tensors, docs = make_memory(2)
        storage.save(str(tmp_path), tensors, docs, FP, lock=held)
        with storage.folder_lock(str(tmp_path)) as inner:
            assert inner.holds_memory
    assert len(storage.load(str(tmp_path)).docs) == 2


def _read_modify_write(d: str, doc_id: str) -> None:
    """Lock, re-read the saved memory, add one document, save: what `msa ingest` does."""
    with storage.folder_lock(d) as held:
        if held.holds_memory:
            old = storage.load(d)
            tensors, docs = {k: v.clone() for k, v in old.tensors.items()}, list(old.docs)
        else:
            tensors, docs = make_memory(0, chunks=[])
        new_t, new_d = make_memory(1, chunks=[2], prefix=doc_id)
        n, c = len(docs), int(tensors["chunk_doc"].shape[0])
        tensors["doc_start"] = torch.cat([tensors["doc_start"], new_t["doc_start"][1:] + c])
        tensors["chunk_doc"] = torch.cat([tensors["chunk_doc"], new_t["chunk_doc"] + n])
        for k in ("keys_r", "keys", "values"):
            tensors[k] = new_t[k] if k not in tensors else torch.cat([tensors[k], new_t[k]], dim=1)
        time.sleep(0.01)  # widen the race window a lost update would need
        storage.save(d, tensors, docs + new_d, FP, lock=held)


def test_concurrent_read_modify_write_threads_lose_nothing(tmp_path):
    d = str(tmp_path / "m")
    threads = [threading.Thread(target=_read_modify_write, args=(d, f"t{i}-")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted(x["id"] for x in storage.load(d).docs)
    assert got == sorted(f"t{i}-0" for i in range(8))


CHILD = """
import sys, time
from msa_plugins.engine import storage
with storage.folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_excludes_another_process(tmp_path):
    save(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(MemoryLockedError, match="another process"):
            storage.save(str(tmp_path), *make_memory(1), FP, timeout=0.3)
        t0 = time.monotonic()
        save(tmp_path, n_docs=5)  # waits for the child, then writes
        assert time.monotonic() - t0 > 0.5
    finally:
        child.wait(30)
    assert len(storage.load(str(tmp_path)).docs) == 5


def test_kill_while_holding_the_lock_frees_it(tmp_path):
    save(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    child.kill()
    child.wait(30)
    save(tmp_path, n_docs=2)  # the OS released the dead writer's lock
    assert len(storage.load(str(tmp_path)).docs) == 2


# ------------------------------------------------------------------ 6: verified on load
def test_flipped_byte_fails_the_checksum_and_verify_false_skips_it(tmp_path):
    m = save(tmp_path)
    path = tmp_path / m["tensors"]["file"]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's data: structure intact, content changed
    path.write_bytes(bytes(raw))
    with pytest.raises(MemoryFormatError, match=f"{m['tensors']['file']}.*checksum"):
        storage.load(str(tmp_path))
    assert len(storage.load(str(tmp_path), verify=False).docs) == 3
    with pytest.raises(MemoryFormatError, match="checksum"):
        storage.verify(str(tmp_path))


def _forged(tmp_path, mutate):
    tensors, docs = make_memory(4)
    storage.save(str(tmp_path), tensors, docs, FP)
    tensors = {k: v.clone() for k, v in tensors.items()}
    mutate(tensors)
    reseal(tmp_path, tensors)


@pytest.mark.parametrize("mutate,words", [
    (lambda t: t["keys_r"].__setitem__((0, 1, 0), float("nan")), "keys_r holds NaN"),
    (lambda t: t["keys_r"].__setitem__((1, 0, 3), float("inf")), "keys_r holds NaN or infinite"),
    (lambda t: t["chunk_doc"].__setitem__(0, 2), "chunk_doc does not match doc_start"),
    (lambda t: t["chunk_doc"].__setitem__(-1, 99), "outside"),
    (lambda t: t["chunk_doc"].__setitem__(0, -1), "outside"),
    (lambda t: t["doc_start"].__setitem__(1, 0), "doc_start is not increasing"),
    (lambda t: t.pop("values"), "lacks values"),
    (lambda t: t.__setitem__("keys", t["keys"][:, :-1]), "keys has shape"),
    (lambda t: t.__setitem__("doc_start", t["doc_start"].int()), "doc_start should be int64"),
])
def test_structural_damage_with_a_valid_checksum_is_refused(tmp_path, mutate, words):
    _forged(tmp_path, mutate)
    with pytest.raises(MemoryFormatError, match=words) as e:
        storage.load(str(tmp_path))
    assert "tensors-" in str(e.value)  # names the file


def test_duplicate_ids_and_bad_records_are_refused(tmp_path):
    tensors, docs = make_memory(3)
    docs[2]["id"] = "d0"
    storage.save(str(tmp_path), tensors, docs, FP)
    with pytest.raises(MemoryFormatError, match="docs-.*'d0' more than once"):
        storage.load(str(tmp_path))
    tensors, docs = make_memory(3)
    docs[1]["parent"] = "zz"  # a part must be named <parent>#<part>
    storage.save(str(tmp_path), tensors, docs, FP)
    with pytest.raises(MemoryFormatError, match="parent"):
        storage.load(str(tmp_path))


def test_fingerprint_mismatch_names_each_setting(tmp_path):
    save(tmp_path)
    with pytest.raises(ModelMismatchError, match="chunk_size: saved 4 vs engine 8.*routing_layers"):
        storage.load(str(tmp_path), {**FP, "chunk_size": 8, "routing_layers": [1]})


# ------------------------------------------------------------------ 10: damaged manifests and headers
@pytest.mark.parametrize("change,words", [
    ({"format_version": 1}, "older msa-plugins.*re-ingest"),
    ({"format_version": 99}, "format 99"),
    ({"format_version": "2"}, "format '2'"),
    ({"fingerprint": None}, "invalid 'fingerprint'"),
    ({"n_documents": "3"}, "invalid 'n_documents'"),
    ({"n_documents": -1}, "invalid 'n_documents'"),
    ({"n_chunks": 1.5}, "invalid 'n_chunks'"),
    ({"tensors": {"file": "../../etc/passwd", "bytes": 1, "sha256": "0" * 64}}, "invalid 'tensors'"),
    ({"documents": {"file": "docs-0123456789abcdef.jsonl"}}, "invalid 'documents'"),
    ({"tensors": []}, "invalid 'tensors'"),
    ({"n_documents": 7}, "the manifest says 7 documents"),
    ({"n_tokens": 1}, "the manifest says 1 tokens"),
])
def test_damaged_manifest_fields(tmp_path, change, words):
    save(tmp_path)
    rewrite_manifest(tmp_path, **change)
    with pytest.raises(MemoryFormatError, match=words) as e:
        storage.load(str(tmp_path))
    assert "manifest.json" in str(e.value)


@pytest.mark.parametrize("drop", ["fingerprint", "n_documents", "n_chunks", "n_tokens", "tensors", "documents",
                                  "previous"])
def test_manifest_missing_keys(tmp_path, drop):
    save(tmp_path)
    path = tmp_path / storage.MANIFEST
    m = json.loads(path.read_text())
    del m[drop]
    path.write_text(json.dumps(m))
    with pytest.raises(MemoryFormatError, match=f"manifest.json.*lacks '{drop}'"):
        storage.load(str(tmp_path))


@pytest.mark.parametrize("text,words", [("", "truncated or not JSON"), ("[1, 2]", "not an object"),
                                        ("{" * 100000, "truncated or not JSON"), ("\xff\xfe", "not JSON")])
def test_unreadable_manifest(tmp_path, text, words):
    save(tmp_path)
    (tmp_path / storage.MANIFEST).write_text(text, encoding="latin-1")
    with pytest.raises(MemoryFormatError, match=words):
        storage.load(str(tmp_path))


def _header_file(path, header: dict, data: bytes = b"", length=None):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header,data,length,words", [
    ({}, b"", 2 ** 63, "declares a header of"),
    ({}, b"", 2 ** 20, "declares a header of"),
    ({"x": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}, b"\0" * 16, None, "has shape"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 2 ** 62]}}, b"\0" * 16, None, "has shape"),
    ({"x": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, b"\0" * 16, None, "truncated"),
    ({"x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "invalid shape"),
    ({"x": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, b"\0" * 16, None, "invalid shape"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, b"\0" * 16, None, "invalid data offsets"),
    ({"x": {"dtype": "F32", "shape": [4]}}, b"\0" * 16, None, "invalid data offsets"),
    ({"x": {"dtype": "O", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "dtype 'O'"),
    ({"x": [1, 2]}, b"", None, "dtype"),
])
def test_damaged_safetensors_header(tmp_path, header, data, length, words):
    path = str(tmp_path / "t.safetensors")
    _header_file(path, header, data, length)
    with pytest.raises(MemoryFormatError, match=words) as e:
        storage.mmap_safetensors(path)
    assert "t.safetensors" in str(e.value)


def test_damaged_tensors_file_through_load(tmp_path):
    m = save(tmp_path)
    path = tmp_path / m["tensors"]["file"]
    path.write_bytes((2 ** 62).to_bytes(8, "little") + path.read_bytes()[8:])
    for verify in (True, False):
        with pytest.raises(MemoryFormatError, match=m["tensors"]["file"]):
            storage.load(str(tmp_path), verify=verify)


def test_damaged_docs_lines(tmp_path):
    m = save(tmp_path)
    path = tmp_path / m["documents"]["file"]
    lines = path.read_text().splitlines()
    for bad in ("not json", json.dumps({"id": "x"}), json.dumps([1]), json.dumps({**json.loads(lines[1]), "n_tokens": 0})):
        path.write_text("\n".join([lines[0], bad, lines[2]]) + "\n")
        rewrite_manifest(tmp_path, documents={**m["documents"], "bytes": path.stat().st_size})
        with pytest.raises(MemoryFormatError, match=f"{m['documents']['file']}: line 2"):
            storage.load(str(tmp_path), verify=False)


def test_missing_data_file(tmp_path):
    m = save(tmp_path)
    os.remove(tmp_path / m["documents"]["file"])
    with pytest.raises(MemoryFormatError, match="named by the manifest is missing"):
        storage.load(str(tmp_path))


@pytest.mark.parametrize("earlier", ["smollm2-135m-v1", "smollm2-135m-v2", "smollm2-135m-v3", "smollm2-135m-v4"])
def test_memory_keyed_by_an_earlier_shipped_router_loads_with_it(tmp_path, earlier):
    """Upgrading the package (a new default router) never strands a saved memory: a memory keyed by an earlier
    packaged router loads with that router; a new memory uses today's default."""
    from msa_plugins import MSAEngine
    from msa_plugins.engine.router import Router
    from msa_plugins.models import DEFAULT_ROUTER_DIR, ROUTERS_DIR

    v1 = os.path.join(ROUTERS_DIR, earlier)
    old = MSAEngine.from_pretrained(router=v1, device="cpu")
    old.add(["Paris is the capital of France.", "The Nile flows north."], ids=["paris", "nile"], progress=False)
    old.save(str(tmp_path / "m"))
    back = MSAEngine.from_pretrained(memory=str(tmp_path / "m"), device="cpu")
    assert back.router.fingerprint() == Router.load(v1).fingerprint() != Router.load(DEFAULT_ROUTER_DIR).fingerprint()
    assert [d.id for d in back.retrieve("capital of France", k=2)] == [d.id for d in old.retrieve("capital of France", k=2)]
    fresh = MSAEngine.from_pretrained(device="cpu")
    assert fresh.router.fingerprint() == Router.load(DEFAULT_ROUTER_DIR).fingerprint()


def test_cli_and_server_open_a_memory_keyed_by_an_earlier_shipped_router(tmp_path):
    """Not only `from_pretrained(memory=)`: `msa ingest/ask/adapt` and `msa serve` build their engine first and
    load the memory after, so they too must pick the router that keyed it (an earlier shipped one here), and a
    server holding an old and a new memory gives each its own router."""
    import json as _json

    from msa_plugins import MSAEngine
    from msa_plugins.cli import main
    from msa_plugins.engine.router import Router
    from msa_plugins.models import DEFAULT_ROUTER_DIR, ROUTERS_DIR
    from msa_plugins.server import open_memories, sibling_engine

    v2_dir = os.path.join(ROUTERS_DIR, "smollm2-135m-v2")
    v2, today = Router.load(v2_dir).fingerprint(), Router.load(DEFAULT_ROUTER_DIR).fingerprint()
    assert v2 != today
    old = MSAEngine.from_pretrained(router=v2_dir, device="cpu")
    old.add(["Paris is the capital of France."], ids=["paris"], progress=False)
    old.save(str(tmp_path / "old"))
    new = sibling_engine(old, router=Router.load(DEFAULT_ROUTER_DIR))
    new.add(["The Nile flows north through Egypt."], ids=["nile"], progress=False)
    new.save(str(tmp_path / "new"))
    doc = tmp_path / "rome.txt"
    doc.write_text("Rome is the capital of Italy.", encoding="utf-8")
    assert main(["--device", "cpu", "ingest", str(doc), "--memory", str(tmp_path / "old")]) == 0
    manifest = _json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert manifest["fingerprint"]["key_mode"] == v2 and manifest["n_documents"] == 2
    memories = open_memories([str(tmp_path / "old"), str(tmp_path / "new")], device="cpu")
    assert memories["old"].engine.router.fingerprint() == v2 and memories["new"].engine.router.fingerprint() == today
    routed = memories["old"].engine.retrieve("capital of France", k=2)
    assert {d.id for d in routed} == {"paris", str(doc)}
    assert next(d.score for d in routed if d.id == "paris") == pytest.approx(
        old.retrieve("capital of France", k=1)[0].score, abs=1e-5)  # scored by v2, as when it was saved
    assert [d.id for d in memories["new"].engine.retrieve("Egypt", k=1)] == ["nile"]
