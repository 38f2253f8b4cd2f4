"""Storage of a memory in a folder: atomic saves, a writer lock, verified memory-mapped loads.

A memory folder holds
    manifest.json                    format version, model fingerprint, counts, the data files with their
                                     size and sha256, and the previous generation's file names
    tensors-<gen>.safetensors        doc_start [N+1], chunk_doc [C], keys_r, keys, values, ... (see bank.py)
    docs-<gen>.jsonl                 one {"id", "text", "metadata", "n_tokens", "parent", "collection"} per document

The tensors file also holds the memory's BM25 index (`lex_*` tensors, see lexical.py), so it is saved in
the same generation, under the same checksum, as the keys; the manifest's "lexical" entry records the
index tokenizer's version (a memory without it, or of another version, is re-indexed from its texts on
load), and its optional "calibration" entry the abstention threshold learned for this memory and router.
    .msa-lock                        the writer lock file (never deleted: deleting lock files races)
    .msa-tmp-<gen>-*                 files of a save in progress (or of a crashed one)

A save (under the folder's lock, across threads and processes) writes the new generation under temporary
names, writes a temporary manifest, renames the data files to their final names, then atomically replaces
`manifest.json` (the commit point) and removes the previous generation. A crash at any point leaves a
manifest naming complete files; the leftovers of a crashed save are recognised by their owned names only
(`.msa-tmp-<gen>-*`, the `tensors-/docs-<gen>` files of such a pending gen, and the files the manifest
lists as `previous`) and removed by the next save or lock. Nothing else in the folder is ever deleted,
and a non-empty folder that is not a memory is refused.

Loading parses the safetensors header itself and memory-maps the data (never unpickles), checks sizes,
sha256 (unless verify=False) and structure; any problem is a MemoryFormatError naming the file.
Readers take no lock: a load that loses a race with a committing writer (a file it was about to open was
just removed) re-reads the new manifest.

Files are created with mode 0644 as masked by the process umask (0644 under the usual umask 022), the
same for the tensors, documents and manifest files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from typing import NamedTuple, Optional

import numpy as np
import torch

from .._io import file_sha256, fsync_dir
from ..errors import InvalidArgumentError, MemoryFormatError, MemoryLockedError, ModelMismatchError
from .lexical import TOKENIZER_VERSION, LexicalIndex

try:
    import fcntl
except ImportError:  # Windows: threads of one process are still excluded; other processes are not
    fcntl = None

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-file sha256, `parent` column, owned temp names (1: the first format)
MANIFEST = "manifest.json"
LOCK_FILE = ".msa-lock"
DEFAULT_LOCK_TIMEOUT = 300.0  # s a writer waits for another (an ingest may encode for minutes under the lock)
FILE_MODE = 0o644  # masked by the umask

_GEN = r"[0-9a-f]{16}"
_TENSORS_RE = re.compile(rf"^tensors-({_GEN})\.safetensors$")
_DOCS_RE = re.compile(rf"^docs-({_GEN})\.jsonl$")
_TMP_RE = re.compile(rf"^\.msa-tmp-({_GEN})-(tensors\.safetensors|docs\.jsonl|manifest\.json)$")
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_HEADER_BYTES = 100 << 20  # a memory's safetensors header is a few hundred bytes

_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32),
              "I16": (np.int16, torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8)}
_ST_NAMES = {t: name for name, (_, t) in _ST_DTYPES.items()}


class Stored(NamedTuple):
    """A loaded memory folder: its manifest, its tensors (CPU, memory-mapped) and its document records."""
    manifest: dict
    tensors: dict
    docs: list  # {"id", "text", "metadata", "n_tokens", "parent"}
    lexical: Optional[LexicalIndex] = None  # None: not saved, or saved by another tokenizer version


# ---------------------------------------------------------------------------------------------- files
class _HashingWriter:
    """A new file (never an existing one) written through sha256, fsynced on close."""

    def __init__(self, path: str):
        self.path = path
        self.f = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> None:
        self.f.write(data)
        self.sha.update(data)
        self.bytes += len(data) if isinstance(data, bytes) else memoryview(data).nbytes

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the same 2 bytes as int16
        t = t.view(torch.int16)
    return memoryview(t.numpy().reshape(-1).view(np.uint8))


def write_safetensors(path: str, tensors: dict) -> tuple:
    """Write `tensors` as a standard safetensors file; returns (bytes, sha256), hashed while writing.

    Tensors are laid out by decreasing element size after an 8-byte-aligned header, so every tensor is
    aligned for its dtype and can be memory-mapped in place."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _ST_NAMES:
            raise InvalidArgumentError(f"cannot store tensor {name!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    w = _HashingWriter(path)
    try:
        w.write(len(raw).to_bytes(8, "little"))
        w.write(raw)
        for name in order:
            if tensors[name].numel():
                w.write(_tensor_bytes(tensors[name]))
    finally:
        w.close()
    return w.bytes, w.sha.hexdigest()


def write_jsonl(path: str, records) -> tuple:
    """One JSON object per line; returns (bytes, sha256)."""
    w = _HashingWriter(path)
    try:
        for rec in records:
            w.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    finally:
        w.close()
    return w.bytes, w.sha.hexdigest()


def _write_json(path: str, obj) -> None:
    w = _HashingWriter(path)
    try:
        w.write(json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"))  # NaN/Infinity: load would refuse it
    finally:
        w.close()


# ---------------------------------------------------------------------------------------------- lock
class _PathLock:
    """The in-process half of a folder lock: flock excludes other open files (processes, and other
    threads' opens), this RLock makes waiting threads sleep instead of poll and lets the owning thread
    re-enter (save inside `locked`)."""

    def __init__(self):
        self.rlock = threading.RLock()
        self.depth = 0  # nested acquisitions by the owning thread
        self.owner: Optional[int] = None  # that thread's ident
        self.fd: Optional[int] = None


_PATH_LOCKS: dict = {}
_PATH_LOCKS_GUARD = threading.Lock()


class FolderLock:
    """Held writer lock on a memory folder (what `folder_lock` yields)."""

    def __init__(self, directory: str, holds_memory: bool):
        self.directory = directory
        self.holds_memory = holds_memory  # manifest.json was there when the lock was taken

    def __repr__(self):
        return f"FolderLock({self.directory!r}, holds_memory={self.holds_memory})"


def check_destination(directory: str) -> str:
    """Create `directory` if missing; refuse a file, or a non-empty folder that is not a memory (no
    manifest, no lock file): a save there must never mix with, or delete, the user's own files."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InvalidArgumentError(f"{directory!r} is a file, not a folder; give a folder for the memory")
    os.makedirs(directory, exist_ok=True)
    names = os.listdir(directory)
    if names and MANIFEST not in names and LOCK_FILE not in names:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise InvalidArgumentError(f"{directory!r} is not empty ({shown}) and holds no saved memory; save the memory "
                                   "into a new or empty folder, not among other files")
    return directory


def _check_owned_names(directory: str) -> None:
    """Refuse, before anything is opened or written, a folder whose lock file or manifest is not a plain file: a
    folder there may hold someone's files (and would fail the save only after its data files were renamed), and
    a link would have the lock create or lock a file outside the memory folder."""
    lock, manifest = os.path.join(directory, LOCK_FILE), os.path.join(directory, MANIFEST)
    if os.path.islink(lock):
        raise MemoryFormatError(f"{lock!r} is a symbolic link; a memory folder's lock must be a plain file in it "
                                "(the lock would create or lock the file it points to): remove the link")
    for path in (lock, manifest):
        if os.path.isdir(path) and not os.path.islink(path):
            raise MemoryFormatError(f"{path!r} is a folder where the memory keeps a file; nothing was written: move "
                                    "it out of the memory folder")


def _flock(directory: str, deadline: float, timeout: float) -> int:
    _check_owned_names(directory)
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)  # a link planted after the check fails here
    fd = os.open(os.path.join(directory, LOCK_FILE), flags, FILE_MODE)
    if fcntl is None:
        return fd
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise MemoryLockedError(
                    f"memory folder {directory!r} is being written by another process (waited {timeout:g} s for "
                    f"its lock {LOCK_FILE}); try again when it is done, or wait longer (timeout=...)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


@contextlib.contextmanager
def folder_lock(directory: str, timeout: float = DEFAULT_LOCK_TIMEOUT):
    """Exclusive writer lock on a memory folder, across processes (an OS file lock on `.msa-lock`) and
    threads (a per-folder RLock); re-entrant in the owning thread. Creates the folder if missing, refuses
    a folder that is not a memory (see check_destination), and on first entry cleans the leftovers of
    crashed saves. Waits up to `timeout` s, then raises MemoryLockedError. Yields a FolderLock."""
    directory = os.path.realpath(check_destination(directory))
    with _PATH_LOCKS_GUARD:
        pl = _PATH_LOCKS.setdefault(directory, _PathLock())
    deadline = time.monotonic() + max(float(timeout), 0.0)
    if not pl.rlock.acquire(timeout=max(float(timeout), 0.0)):
        raise MemoryLockedError(f"memory folder {directory!r} is being written by another thread of this process "
                                f"(waited {timeout:g} s); try again when it is done, or wait longer (timeout=...)")
    try:
        if pl.depth == 0:
            pl.fd = _flock(directory, deadline, timeout)
            try:
                clean_orphans(directory)
            except BaseException:
                _unflock(pl)
                raise
            pl.owner = threading.get_ident()
        pl.depth += 1
        try:
            yield FolderLock(directory, os.path.isfile(os.path.join(directory, MANIFEST)))
        finally:
            pl.depth -= 1
            if pl.depth == 0:
                pl.owner = None
                _unflock(pl)
    finally:
        pl.rlock.release()


def _unflock(pl: _PathLock) -> None:
    fd, pl.fd = pl.fd, None
    if fd is not None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _lock_held(directory: str) -> bool:
    pl = _PATH_LOCKS.get(os.path.realpath(directory))
    return pl is not None and pl.depth > 0 and pl.owner == threading.get_ident()


def remove_file(path: str) -> int:
    """Delete one file -> the bytes freed (0 when it is already gone). A folder under one of our file names was
    not made by a save (saves write files only) and may hold someone's files: it is left where it is, with a
    warning, so that it cannot block every later save."""
    if os.path.isdir(path) and not os.path.islink(path):
        logger.warning("%s is a folder under a name memory saves use for their files; left in place (not a save's "
                       "leftover): move it out of the memory folder", path)
        return 0
    try:
        size = os.lstat(path).st_size  # a link (dangling or not) is removed as itself, never its target
        os.remove(path)
        return size
    except FileNotFoundError:
        return 0


def clean_orphans(directory: str) -> int:
    """Remove the leftovers of crashed saves, recognised by owned names only; returns the bytes freed.
    Call under the folder lock (a save in progress in another process looks just like a crashed one)."""
    names = set(os.listdir(directory))
    current = set()
    if MANIFEST in names:
        try:
            manifest = read_manifest(directory)
        except MemoryFormatError:  # a damaged manifest: we cannot tell which files it meant, remove no data file
            manifest = None
        if manifest is not None:
            current = {manifest["tensors"]["file"], manifest["documents"]["file"]}
            prev = manifest.get("previous") or {}
            doomed = [n for n in (prev.get("tensors"), prev.get("documents")) if isinstance(n, str)
                      and (_TENSORS_RE.match(n) or _DOCS_RE.match(n)) and n not in current]
        else:
            doomed = []
    else:
        manifest, doomed = None, []
    superseded = set(doomed)  # the generation the committed manifest replaced: routine, not a crash's leftover
    pending = set()
    for name in names:
        m = _TMP_RE.match(name)
        if m:
            doomed.append(name)
            pending.add(m.group(1))
    if manifest is not None or MANIFEST not in names:  # a pending generation's renamed data files
        for gen in pending:
            doomed += [n for n in (f"tensors-{gen}.safetensors", f"docs-{gen}.jsonl") if n not in current]
    freed = leftover = 0
    for name in doomed:
        size = remove_file(os.path.join(directory, name))
        freed += size
        leftover += 0 if name in superseded else size
    # Removing the generation a committed save replaced is routine; only a crashed save's leftovers are news.
    if leftover:
        logger.info("removed %d bytes left by an interrupted save in %s", leftover, directory)
    if freed - leftover:
        logger.debug("removed the previous generation (%d bytes) in %s", freed - leftover, directory)
    return freed


# ---------------------------------------------------------------------------------------------- save
def save(directory: str, tensors: dict, docs: list, fingerprint: dict, lock: Optional[FolderLock] = None,
         timeout: float = DEFAULT_LOCK_TIMEOUT, extra: Optional[dict] = None, on_commit=None) -> dict:
    """Atomically write a memory (tensors: name -> tensor; docs: records) into `directory` under its
    writer lock (re-entered when the caller holds it, e.g. `lock` from folder_lock). `extra`: more
    manifest entries ("lexical", "calibration"). `on_commit()`: called right after the commit point. Returns
    the manifest."""
    if lock is not None and not _lock_held(lock.directory):
        raise InvalidArgumentError("the lock passed to save is not held by this thread; save inside its `with` block")
    with folder_lock(directory, timeout=timeout) as held:
        return _save_locked(held.directory, tensors, docs, fingerprint, extra, on_commit)


def _save_locked(directory: str, tensors: dict, docs: list, fingerprint: dict, extra: Optional[dict] = None,
                 on_commit=None) -> dict:
    try:  # before any file is written: a manifest load would refuse is never saved
        json.dumps({"fingerprint": fingerprint, **(extra or {})}, allow_nan=False)
    except ValueError as e:
        raise InvalidArgumentError(f"the memory's manifest entries are not finite JSON ({e}); nothing was saved") \
            from None
    previous = None
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        try:
            old = read_manifest(directory)
            previous = {"tensors": old["tensors"]["file"], "documents": old["documents"]["file"]}
        except MemoryFormatError as e:  # overwrite it, but leave its files: we cannot tell which they are
            logger.warning("replacing a damaged manifest in %s (%s); its data files are left in place", directory, e)
    gen = uuid.uuid4().hex[:16]
    tensors_name, docs_name = f"tensors-{gen}.safetensors", f"docs-{gen}.jsonl"
    tmp = {k: os.path.join(directory, f".msa-tmp-{gen}-{k}") for k in ("tensors.safetensors", "docs.jsonl",
                                                                     "manifest.json")}
    t_bytes, t_sha = write_safetensors(tmp["tensors.safetensors"], tensors)
    d_bytes, d_sha = write_jsonl(tmp["docs.jsonl"], docs)
    manifest = {
        "format_version": FORMAT_VERSION,
        "generation": gen,
        "fingerprint": fingerprint,
        "n_documents": len(docs),
        "n_chunks": int(tensors["chunk_doc"].shape[0]),
        "n_tokens": int(sum(d["n_tokens"] for d in docs)),
        "tensors": {"file": tensors_name, "bytes": t_bytes, "sha256": t_sha},
        "documents": {"file": docs_name, "bytes": d_bytes, "sha256": d_sha},
        "previous": previous,
        **(extra or {}),
    }
    # The temporary manifest is durable before the data files take final names: a crash between the
    # renames and the commit leaves final-named files that the next lock can still recognise as pending.
    _write_json(tmp["manifest.json"], manifest)
    fsync_dir(directory)
    os.rename(tmp["tensors.safetensors"], os.path.join(directory, tensors_name))
    os.rename(tmp["docs.jsonl"], os.path.join(directory, docs_name))
    os.replace(tmp["manifest.json"], os.path.join(directory, MANIFEST))  # the commit point
    if on_commit is not None:
        on_commit()
    try:  # the save has happened: a failure from here on must not tell the caller it did not
        fsync_dir(directory)
        clean_orphans(directory)  # the previous generation (named by the new manifest) and any other leftovers
    except OSError as e:
        logger.warning("saved generation %s to %s, but cleaning up after it failed (%s); the next save removes "
                       "the previous generation's files", gen, directory, e)
    return manifest


# ---------------------------------------------------------------------------------------------- load
def _fail(path: str, problem: str, fix: str = "restore the folder from a backup or re-ingest the documents"):
    raise MemoryFormatError(f"{path}: {problem}; {fix}")


def _is_int(v, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def read_manifest(directory: str) -> dict:
    """The folder's manifest, with every field the loader uses checked for presence and type."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "is missing"
        raise MemoryFormatError(f"{directory!r} holds no saved memory ({MANIFEST} {what})")
    if os.path.getsize(path) > _MAX_MANIFEST_BYTES:
        _fail(path, f"is {os.path.getsize(path)} bytes, far larger than a manifest")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _fail(path, f"is truncated or not JSON ({e})")
    if not isinstance(manifest, dict):
        _fail(path, f"holds a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if _is_int(version) and version < FORMAT_VERSION:
            _fail(path, f"was written by an older msa-plugins (memory format {version}; this one reads "
                        f"{FORMAT_VERSION})", "re-ingest the documents into a new memory")
        _fail(path, f"has memory format {version!r}; this msa-plugins reads format {FORMAT_VERSION}",
              "upgrade msa-plugins or re-ingest the documents")
    checks = {"fingerprint": lambda v: isinstance(v, dict), "n_documents": _is_int, "n_chunks": _is_int,
              "n_tokens": _is_int, "tensors": lambda v: _file_entry(v, _TENSORS_RE),
              "documents": lambda v: _file_entry(v, _DOCS_RE),
              "previous": lambda v: v is None or isinstance(v, dict)}
    optional = {"lexical": lambda v: isinstance(v, dict) and isinstance(v.get("tokenizer"), str),
                "calibration": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("threshold"), float)
                                                       and math.isfinite(v["threshold"]))}
    for key, ok in checks.items():
        if key not in manifest:
            _fail(path, f"lacks {key!r}: the manifest was edited or damaged")
        if not ok(manifest[key]):
            _fail(path, f"has an invalid {key!r} ({str(manifest[key])[:80]}): the manifest was edited or damaged")
    for key, ok in optional.items():  # entries added after format 2 (absent in older memories)
        if key in manifest and not ok(manifest[key]):
            _fail(path, f"has an invalid {key!r} ({str(manifest[key])[:80]}): the manifest was edited or damaged")
    return manifest


def _file_entry(v, name_re) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("file"), str) and bool(name_re.match(v["file"]))
            and _is_int(v.get("bytes")) and isinstance(v.get("sha256"), str)
            and bool(re.fullmatch(r"[0-9a-f]{64}", v["sha256"])))


# engine fingerprint entries present only when a setting differs from its default (older memories lack them)
OPTIONAL_FINGERPRINT_KEYS = ("doc_score", "routing_chunk_size")


def check_fingerprint(manifest: dict, fingerprint: dict, directory: str) -> None:
    """ModelMismatchError naming each setting where the saved memory and the engine differ."""
    saved = manifest["fingerprint"]
    # settings fingerprinted only when not their default are also compared when only the memory names one:
    # a memory keyed with 16-token routing chunks must not load into an engine that keys with 64
    keys = list(fingerprint) + [k for k in OPTIONAL_FINGERPRINT_KEYS if k in saved and k not in fingerprint]
    implied = {"doc_score": lambda fp: "maxmax", "routing_chunk_size": lambda fp: fp.get("chunk_size")}

    def value(fp, k):  # an absent optional setting has its implied value (P_R absent: P_R = P)
        return fp[k] if k in fp else implied[k](fp) if k in implied else None

    mismatch = [k for k in dict.fromkeys(keys) if value(saved, k) != value(fingerprint, k)]
    if mismatch:
        details = ", ".join(f"{k}: saved {value(saved, k)!r} vs engine {value(fingerprint, k)!r}" for k in mismatch)
        raise ModelMismatchError(
            f"memory {os.fspath(directory)!r} was built with a different model or settings ({details}); load it "
            "with the engine that built it, or re-ingest the documents with this one")


def mmap_safetensors(path: str) -> dict:
    """Memory-map a safetensors file (copy-on-write): parse and check its JSON header, map each tensor.
    Never unpickles; any inconsistency is a MemoryFormatError naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            _fail(path, "is truncated (no header)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            _fail(path, f"declares a header of {n} bytes in a file of {size}: truncated or not a tensors file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, RecursionError) as e:
            _fail(path, f"has a damaged header ({e})")
    if not isinstance(header, dict):
        _fail(path, "has a header that is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
            _fail(path, f"tensor {name!r} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}, "
                        "which a memory never holds: the file was replaced or damaged")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_int(s) for s in shape)):
            _fail(path, f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            _fail(path, f"tensor {name!r} has invalid data offsets {str(offsets)[:80]}")
        np_dtype, t_dtype = _ST_DTYPES[info["dtype"]]
        itemsize = np.dtype(np_dtype).itemsize
        start, end = offsets
        count = math.prod(shape)  # Python ints: a huge shape is compared, never allocated
        if (end - start) != count * itemsize:
            _fail(path, f"tensor {name!r} has shape {shape} but {end - start} bytes of data")
        if 8 + n + end > size:
            _fail(path, f"is truncated (tensor {name!r} ends past the end of the file)")
        if (8 + n + start) % itemsize:
            _fail(path, f"tensor {name!r} is not aligned for its dtype")
        if count == 0:
            out[name] = torch.zeros(shape, dtype=t_dtype)
            continue
        arr = np.memmap(path, dtype=np_dtype, mode="c", offset=8 + n + start, shape=(count,))
        t = torch.from_numpy(arr)
        if t_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t.view(shape)
    return out


def _read_docs(path: str) -> list:
    docs = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError) as e:
                _fail(path, f"line {i} is not JSON ({e})")
            if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec["id"]
                    and isinstance(rec.get("text"), str) and isinstance(rec.get("metadata"), dict)
                    and _is_int(rec.get("n_tokens"), 1) and (rec.get("parent") is None or isinstance(rec["parent"], str))
                    and isinstance(rec.get("collection", "default"), str) and rec.get("collection", "default")):
                _fail(path, f"line {i} is not a document record (id, text, metadata, n_tokens, parent, collection)")
            if rec.get("parent") is not None and not rec["id"].startswith(rec["parent"] + "#"):
                _fail(path, f"line {i}: document {rec['id']!r} names parent {rec['parent']!r}, but a part's id is "
                            "<parent>#<part>")
            docs.append(rec)
    return docs


def read_stored(directory: str, manifest: dict, verify: bool = True) -> Stored:
    """Read the data files a manifest names (CPU tensors, memory-mapped) and check them: sizes always,
    sha256 when `verify`, and the structure always (counts, shapes, the chunk->document table, unique
    ids, finite routing keys)."""
    directory = os.fspath(directory)
    tpath = os.path.join(directory, manifest["tensors"]["file"])
    dpath = os.path.join(directory, manifest["documents"]["file"])
    for p, entry in ((tpath, manifest["tensors"]), (dpath, manifest["documents"])):
        if not os.path.isfile(p):
            raise MemoryFormatError(f"{p} named by the manifest is missing; restore the folder from a backup")
        if os.path.getsize(p) != entry["bytes"]:
            _fail(p, f"has {os.path.getsize(p)} bytes, the manifest says {entry['bytes']}: the file is truncated "
                     "or was replaced")
        if verify and file_sha256(p) != entry["sha256"]:
            _fail(p, "does not match its checksum in the manifest: it was edited, damaged or replaced")
    tensors = mmap_safetensors(tpath)
    docs = _read_docs(dpath)
    n, c, L = manifest["n_documents"], manifest["n_chunks"], len(manifest["fingerprint"].get("routing_layers") or [])
    mpath = os.path.join(directory, MANIFEST)
    if len(docs) != n:
        _fail(mpath, f"the manifest says {n} documents but {dpath} holds {len(docs)}: the manifest was edited or damaged")
    if sum(d["n_tokens"] for d in docs) != manifest["n_tokens"]:
        _fail(mpath, f"the manifest says {manifest['n_tokens']} tokens but {dpath} counts "
                     f"{sum(d['n_tokens'] for d in docs)}: the manifest was edited or damaged")
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(d for i, d in enumerate(ids) if d in ids[:i])
        _fail(dpath, f"holds id {dup!r} more than once")
    fp = manifest["fingerprint"]
    P = fp.get("chunk_size")
    _check_tensors(tpath, tensors, n, c, L, n_tokens=[d["n_tokens"] for d in docs],
                   chunk_sizes=(fp.get("routing_chunk_size", P), P) if isinstance(P, int) else None)
    lexical = None
    if manifest.get("lexical", {}).get("tokenizer") == TOKENIZER_VERSION:
        try:
            lexical = LexicalIndex.from_tensors(tensors, n)
        except ValueError as e:
            _fail(tpath, f"{e}: the lexical (BM25) index was altered or damaged")
        if lexical.n_terms != manifest["lexical"].get("n_terms"):
            _fail(tpath, f"the lexical index holds {lexical.n_terms} terms, the manifest says "
                         f"{manifest['lexical'].get('n_terms')}: the files do not belong together")
    return Stored(manifest, tensors, docs, lexical)


def _check_tensors(tpath: str, t: dict, n: int, c: int, L: int, n_tokens: Optional[list] = None,
                   chunk_sizes: Optional[tuple] = None) -> None:
    """Shapes and offsets of a memory's tensors. With `n_tokens` (per document) and `chunk_sizes` (P_R, P):
    each document also owns exactly ceil(n_tokens / P_R) routing and ceil(n_tokens / P) content chunks, as
    encoding pools them, so no offset table can hand one document's chunks to another."""
    for name, shape in (("doc_start", (n + 1,)), ("chunk_doc", (c,))):
        if name not in t or t[name].dtype != torch.int64 or tuple(t[name].shape) != shape:
            got = (t[name].dtype, tuple(t[name].shape)) if name in t else "nothing"
            _fail(tpath, f"{name} should be int64 of shape {shape} (the manifest's counts), got {got}")
    doc_start, chunk_doc = t["doc_start"], t["chunk_doc"]
    counts = doc_start[1:] - doc_start[:-1]
    if int(doc_start[0]) != 0 or int(doc_start[-1]) != c or (n and int(counts.min()) < 1):
        _fail(tpath, "doc_start is not increasing from 0 to the chunk count: the document offsets are damaged")
    if c and (int(chunk_doc.min()) < 0 or int(chunk_doc.max()) >= n):
        _fail(tpath, f"chunk_doc maps chunks to documents outside 0..{n - 1}")
    if not torch.equal(chunk_doc, torch.repeat_interleave(torch.arange(n), counts)):
        _fail(tpath, "chunk_doc does not match doc_start: the chunk-to-document table was altered")
    c_content = c  # content chunks (K̄, V̄): their own offsets when routing keys pool fewer tokens (P_R != P)
    if "content_start" in t:
        cs = t["content_start"]
        if cs.dtype != torch.int64 or tuple(cs.shape) != (n + 1,):
            _fail(tpath, f"content_start should be int64 of shape {(n + 1,)}, got {(cs.dtype, tuple(cs.shape))}")
        if int(cs[0]) != 0 or (n and int((cs[1:] - cs[:-1]).min()) < 1):
            _fail(tpath, "content_start is not increasing from 0: the content chunk offsets are damaged")
        c_content = int(cs[-1])
    if n and n_tokens is not None and chunk_sizes is not None and all(isinstance(x, int) and x > 0 for x in chunk_sizes):
        tok = torch.tensor(n_tokens, dtype=torch.int64)
        for name, offsets, size in (("doc_start", doc_start, chunk_sizes[0]),
                                    ("content_start", t.get("content_start", doc_start), chunk_sizes[1])):
            if not torch.equal(offsets[1:] - offsets[:-1], (tok + size - 1) // size):
                _fail(tpath, f"{name} gives documents other chunk counts than their token counts pooled over {size} "
                             "tokens: the offsets or the document list were altered")
    required = ("keys_r", "keys", "values") if c else ()
    for name in ("keys_r", "keys", "values", "inputs", "keys_r_scale"):
        x = t.get(name)
        if x is None:
            if name in required:
                _fail(tpath, f"lacks {name}")
            continue
        want = c_content if name in ("keys", "values") else c
        if x.dim() != 3 or x.shape[0] != L or x.shape[1] != want:
            _fail(tpath, f"{name} has shape {tuple(x.shape)}, but the manifest and offsets say {L} routing layers "
                         f"and {want} chunks: the files do not belong together")
    if c:
        if t["keys"].shape != t["values"].shape or t["keys_r"].shape[2] != t["keys"].shape[2]:
            _fail(tpath, f"keys_r {tuple(t['keys_r'].shape)}, keys {tuple(t['keys'].shape)} and values "
                         f"{tuple(t['values'].shape)} should have one width (keys and values one shape)")
        int8 = t["keys_r"].dtype == torch.int8
        if int8 != ("keys_r_scale" in t):
            _fail(tpath, "int8 routing keys need keys_r_scale (and only they have one)")
        check = t["keys_r_scale"] if int8 else t["keys_r"]
        if not bool(torch.isfinite(check).all()):
            _fail(tpath, f"{'keys_r_scale' if int8 else 'keys_r'} holds NaN or infinite values: routing would "
                         "silently skip documents")


def load(directory: str, fingerprint=None, verify: bool = True, attempts: int = 3) -> Stored:
    """Read a saved memory (no lock: see the module doc). Checks the fingerprint (when given) before
    reading any data file. `fingerprint`: a dict, or a function of the saved fingerprint returning the one
    to check (an engine that adopts a stored setting checks against the manifest it actually reads)."""
    directory = os.fspath(directory)
    for attempt in range(attempts):
        manifest = read_manifest(directory)
        if fingerprint is not None:
            check_fingerprint(manifest, fingerprint(manifest["fingerprint"]) if callable(fingerprint) else fingerprint,
                              directory)
        try:
            return read_stored(directory, manifest, verify=verify)
        except (MemoryFormatError, FileNotFoundError):
            # A writer may have committed a new generation (and removed this one's files) meanwhile.
            try:
                changed = read_manifest(directory).get("generation") != manifest.get("generation")
            except MemoryFormatError:
                changed = False
            if not changed or attempt == attempts - 1:
                raise
            logger.info("memory %s changed while loading; reading the new version", directory)
    raise AssertionError("unreachable")


def verify(directory: str) -> dict:
    """Check a saved memory completely (checksums and structure) without keeping it; returns its manifest."""
    return load(directory, verify=True).manifest
