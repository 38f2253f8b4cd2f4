"""Collections as the LlamaIndex surfaces use them: one engine memory, several named collections.

A surface (an `MSAVectorStore`, an `MSARetriever`, an `MSAMemoryBlock`) reads and writes only its
collection; the engine filters before routing, so another collection's documents never reach a search or
a prompt. "default" is the engine's own collection (what `engine.add` / `engine.query` use)."""

from __future__ import annotations

from msa_plugins import ALL_COLLECTIONS, DEFAULT_COLLECTION
from msa_plugins.validation import check_collection

MEMORY_BLOCK_COLLECTION = "llama_index_memory"  # MSAMemoryBlock's default: agent memories stay out of search

__all__ = ["DEFAULT_COLLECTION", "ALL_COLLECTIONS", "MEMORY_BLOCK_COLLECTION", "check_collection"]
