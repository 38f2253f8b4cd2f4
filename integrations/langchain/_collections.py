"""Collections as the LangChain surfaces use them: one engine memory, several named collections.

Routing, listing and id lookups of a surface see only its collection (the engine filters before routing),
so a LangGraph store item never comes back from a vector store search or from `ChatMSA` routing.
"""

from __future__ import annotations

from msa_plugins import ALL_COLLECTIONS, DEFAULT_COLLECTION, MemoryDocument
from msa_plugins.validation import check_collection

STORE_COLLECTION = "langgraph_store"  # MSAStore's default: agent memories stay out of document search


def collection_kwargs(engine, collection: str) -> dict:
    """The keyword selecting `collection` in an engine call (one place, should the engine's name change)."""
    return {"collection": collection}


def in_collection(doc: MemoryDocument, collection: str) -> bool:
    """Does `doc` belong to `collection` (ALL_COLLECTIONS admits every document)?"""
    return collection == ALL_COLLECTIONS or doc.collection == collection


def documents_of(snapshot, collection: str) -> list:
    """The documents of `collection` in a snapshot, in storage order."""
    return list(snapshot.documents(collection=collection))


__all__ = ["DEFAULT_COLLECTION", "ALL_COLLECTIONS", "STORE_COLLECTION", "check_collection", "collection_kwargs",
           "in_collection", "documents_of"]
