"""msa-plugins: Memory Sparse Attention (EverMind) memory for any Hugging Face causal LM, behind the
interfaces of LlamaIndex and LangChain.

The public surface is what this module exports (`__all__`); everything under `msa_plugins.engine` and
`msa_plugins.kernels` is internal to the engine.
"""

from importlib.metadata import PackageNotFoundError, version

from .config import ALL_COLLECTIONS, DEFAULT_COLLECTION, AnswerOptions, MSAConfig
from .core import MSAEngine
from .engine.routing import Routing
from .errors import (CallTimeoutError, DatasetNotFoundError, DocumentNotFoundError, DuplicateIdError, EmptyMemoryError,
                     InputTooLongError, InvalidArgumentError, InvalidTypeError, MemoryFormatError, MemoryLockedError,
                     ModelMismatchError, MSAError, PathNotFoundError, RouterMismatchError,
                     ToolCallError, UnsupportedModelError)
from .types import GenerationResult, MemoryDocument, QueryResult, RoutedDocument, Snapshot, Stream

try:
    __version__ = version("msa-plugins")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = [
    "MSAEngine", "MSAConfig", "AnswerOptions", "DEFAULT_COLLECTION", "ALL_COLLECTIONS",
    "Snapshot", "MemoryDocument", "RoutedDocument", "Routing", "Stream", "QueryResult", "GenerationResult",
    "MSAError", "InvalidArgumentError", "InvalidTypeError", "InputTooLongError", "UnsupportedModelError",
    "MemoryFormatError", "ModelMismatchError", "RouterMismatchError", "EmptyMemoryError", "DocumentNotFoundError",
    "DuplicateIdError", "MemoryLockedError", "CallTimeoutError", "PathNotFoundError", "ToolCallError",
    "DatasetNotFoundError",
    "__version__",
]
