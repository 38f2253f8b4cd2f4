"""File helpers shared by every layer: content hashes and durable writes.

Imports only the standard library, so the model resolver, the memory storage and the CLI can all use it
without pulling in torch.
"""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (model files are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str) -> None:
    """Flush a written file's data to disk before it is renamed into place."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is synced). Best effort: some
    file systems refuse to open a folder for fsync, and a failure there must not fail the save."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["file_sha256", "fsync_file", "fsync_dir"]
