"""Every error msa-plugins raises on purpose, under one base, `MSAError`.

Each error also keeps the builtin base a caller would expect (`ValueError` for a bad value, `TypeError`
for a wrong type, `KeyError` for an unknown id, ...), so `except ValueError` keeps working. The message
always names the problem and what to do about it.

This module imports nothing: every layer of the package (engine, integrations, CLI) may raise these.
"""

from __future__ import annotations


class MSAError(Exception):
    """Base of every error msa-plugins raises on purpose."""


class InvalidArgumentError(MSAError, ValueError):
    """An argument has the right type but a value that cannot be used (k=0, an empty question, ...)."""


class InvalidTypeError(MSAError, TypeError):
    """An argument has the wrong type (k="3", allow-list given as one string, ...)."""


class InputTooLongError(InvalidArgumentError):
    """A question, prompt or document is longer than a limit (the model's window, a configured cap)."""


class UnsupportedModelError(MSAError, ValueError):
    """A model folder or file that msa-plugins cannot run (family, format, custom code)."""


class MemoryFormatError(MSAError, ValueError):
    """A saved memory folder that cannot be read: missing, truncated, tampered or from another version."""


class ModelMismatchError(MSAError, ValueError):
    """A memory was built by another model, tokenizer, router or encoding setting than the engine's."""


class RouterMismatchError(MSAError, ValueError):
    """A router adapter that does not fit the model (shapes, layers, another model's config)."""


class EmptyMemoryError(MSAError, LookupError):
    """Routing was asked of a memory that holds no documents."""


class DocumentNotFoundError(MSAError, KeyError):
    """Ids that the memory does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DuplicateIdError(InvalidArgumentError):
    """An id given twice in one call, or already held by the memory on an add."""


class MemoryLockedError(MSAError, TimeoutError):
    """Another writer (thread or process) holds a memory folder's lock for longer than we may wait."""


class CallTimeoutError(MSAError, TimeoutError):
    """A call ran past the time limit its caller set (`ChatMSA(timeout=...)`); what it generated is discarded."""


class PathNotFoundError(MSAError, FileNotFoundError):
    """A file or folder the caller named (model, router, memory, corpus) does not exist."""


class ToolCallError(MSAError, ValueError):
    """The model did not produce a valid tool call or structured output within the allowed retries."""


class DatasetNotFoundError(PathNotFoundError):
    """An evaluation data set that is not where the data root says."""


__all__ = [
    "MSAError", "InvalidArgumentError", "InvalidTypeError", "InputTooLongError", "UnsupportedModelError",
    "MemoryFormatError", "ModelMismatchError", "RouterMismatchError", "EmptyMemoryError",
    "DocumentNotFoundError", "DuplicateIdError", "MemoryLockedError", "CallTimeoutError", "PathNotFoundError",
    "ToolCallError", "DatasetNotFoundError",
]
