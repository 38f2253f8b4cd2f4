"""`MSAStore`: a LangGraph `BaseStore` (agent long-term memory) whose items live in an engine's memory.

The only module of this package that imports langgraph, so `ChatMSA` and the retrievers work without it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Iterable, Optional

from langgraph.store.base import BaseStore, GetOp, Item, ListNamespacesOp, PutOp, SearchItem, SearchOp
from langgraph.store.base.embed import get_text_at_path

from msa_plugins import InvalidArgumentError, InvalidTypeError, MemoryDocument, Snapshot
from msa_plugins.validation import check_text

from ._collections import STORE_COLLECTION, check_collection, collection_kwargs, documents_of, in_collection

_MARK = "msa_store"  # metadata flag of store items: other documents in the same memory are never items


def _doc_id(namespace: tuple, key: str) -> str:
    return json.dumps([list(namespace), key], ensure_ascii=False)


def _is_item(doc: MemoryDocument) -> bool:
    return bool(doc.metadata.get(_MARK))


def _is_indexed(doc: MemoryDocument) -> bool:
    return doc.metadata.get("indexed", True)  # items written before `index=` was honoured were all routable


def _item(meta: dict, cls=Item, **extra):
    return cls(value=meta["value"], key=meta["key"], namespace=tuple(meta["namespace"]),
               created_at=datetime.fromisoformat(meta["created_at"]),
               updated_at=datetime.fromisoformat(meta["updated_at"]), **extra)


# LangGraph's store filter language (`InMemoryStore`, Postgres JSONB): a field's value, a nested dict matched by
# containment, or a dict of these comparison operators; ordering operators compare as numbers
_STORE_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")


def check_store_filter(flt) -> None:
    """Refuse what LangGraph's store filters cannot express, before any routing work."""
    if flt is None:
        return
    if callable(flt) or not isinstance(flt, dict):
        raise InvalidTypeError(f"MSAStore.search takes a dict filter on item values ({{'kind': 'pet'}}, "
                               f"{{'n': {{'$gt': 1}}}}), got {type(flt).__name__}")
    for key, cond in flt.items():
        if not isinstance(key, str):
            raise InvalidTypeError(f"store filter keys are field names (str), got {key!r}")
        if key.startswith("$"):
            raise InvalidArgumentError(f"store filters match fields, not {key!r}: write {{'field': value}} or "
                                       f"{{'field': {{'$gte': 2}}}} (LangGraph's operators: {', '.join(_STORE_OPS)})")
        if isinstance(cond, dict):
            ops = [k for k in cond if isinstance(k, str) and k.startswith("$")]
            bad = [k for k in cond if k not in _STORE_OPS]
            if ops and bad:
                raise InvalidArgumentError(f"unknown store filter operator(s) {bad} on {key!r}; LangGraph's store "
                                           f"filters take {', '.join(_STORE_OPS)}")
            if not ops:
                check_store_filter(cond)


def _store_operator(value, op: str, arg) -> bool:
    if op == "$eq":
        return value == arg
    if op == "$ne":
        return value != arg
    if value is None:  # a field the item lacks is not greater or smaller than anything (LangGraph's raises)
        return False
    try:
        a, b = float(value), float(arg)
    except (TypeError, ValueError):
        raise InvalidTypeError(f"store filter {op} {arg!r} compares numbers, as LangGraph's store does; the item "
                               f"value {value!r} is not one") from None
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]


def store_value_matches(item_value, filter_value) -> bool:
    """LangGraph's `_compare_values`: a nested dict matches by containment (extra keys allowed), a list
    element-wise, an operator dict by all its operators, anything else by equality."""
    if isinstance(filter_value, dict):
        if any(k.startswith("$") for k in filter_value):
            return all(_store_operator(item_value, op, arg) for op, arg in filter_value.items())
        return isinstance(item_value, dict) and all(store_value_matches(item_value.get(k), v)
                                                    for k, v in filter_value.items())
    if isinstance(filter_value, (list, tuple)):
        return isinstance(item_value, (list, tuple)) and len(item_value) == len(filter_value) \
            and all(store_value_matches(i, f) for i, f in zip(item_value, filter_value))
    return item_value == filter_value


def _in_put_order(docs: list) -> list:
    """Items as LangGraph's InMemoryStore lists them: namespaces in the order they were first written to, each
    namespace's items in the order they were first put (an overwrite keeps its place: created_at survives it)."""
    first = {}
    for d in docs:
        ns = tuple(d.metadata["namespace"])
        first[ns] = min(first.get(ns, d.metadata["created_at"]), d.metadata["created_at"])
    return sorted(docs, key=lambda d: (first[tuple(d.metadata["namespace"])], d.metadata["created_at"]))


def _first_per_item(docs: Iterable[MemoryDocument]) -> list:
    """One document per item: an item whose text was split into parts appears once (its best part)."""
    seen, out = set(), []
    for doc in docs:
        key = _doc_id(doc.metadata["namespace"], doc.metadata["key"])
        if key not in seen:
            seen.add(key)
            out.append(doc)
    return out


class MSAStore(BaseStore):
    """LangGraph long-term memory store in an MSAEngine's memory.

    Each item is one memory document (id = [namespace, key]) in the store's own collection (default
    "langgraph_store"), so items never surface in an `MSAVectorStore` search or in `ChatMSA` routing of another
    collection. Its value, timestamps and namespace live in the document's metadata, so `engine.save` /
    `engine.load` persist the store. Namespaces are separate scopes: a search routes only over documents under
    its namespace prefix (the engine filters before routing). The routed text of an item is `value[text_field]`
    when that is a non-empty str (default "text"), else the value as JSON; `put(..., index=["a", "b.c"])`
    routes on those fields instead (LangGraph's path syntax), and `put(..., index=False)` stores the item
    without making it routable: a query search ranks the indexed items and fills the rest of `limit` with
    unindexed ones (score None), as LangGraph's InMemoryStore does. No TTL.

    Setup / instantiate:
        store = MSAStore(MSAEngine.from_pretrained())                 # or collection_name="tenant-a-memories"
    Use:
        store.put(("memories", "ana"), "pet", {"text": "Ana's cat is called Biscuit."})
        store.search(("memories", "ana"), query="What is my cat called?", limit=3)
        create_agent(model, tools, store=store)      # or StateGraph(...).compile(store=store)
    """

    supports_ttl = False

    def __init__(self, engine, text_field: str = "text", *, collection_name: str = STORE_COLLECTION):
        self.engine = engine
        self.text_field = text_field
        self.collection_name = check_collection(collection_name)

    def _in(self) -> dict:
        return collection_kwargs(self.engine, self.collection_name)

    def _text(self, value: dict, index) -> tuple:
        """-> (routed text, indexed?) of a value under `put`'s `index` argument."""
        as_json = json.dumps(value, ensure_ascii=False, sort_keys=True)
        if index is False:
            return as_json, False  # stored (the engine needs some text) but never routed
        if index is None:
            text = value.get(self.text_field)
            return (text if isinstance(text, str) and text.strip() else as_json), True
        if isinstance(index, str) or not all(isinstance(p, str) for p in index):
            raise InvalidTypeError(f"index must be False, None or a list of field paths (str), got {index!r}")
        texts = [t for path in index for t in get_text_at_path(value, path) if t.strip()]
        return ("\n".join(texts), True) if texts else (as_json, False)  # no text at those paths: not indexed

    # ------------------------------------------------------------------ ops
    def _get(self, op: GetOp, snap: Snapshot) -> Optional[Item]:
        doc_id = _doc_id(op.namespace, op.key)
        if doc_id not in snap:
            return None
        doc = snap.get([doc_id])[0]
        return _item(doc.metadata) if _is_item(doc) and in_collection(doc, self.collection_name) else None

    def _put(self, op: PutOp) -> None:
        if not isinstance(op.key, str) or not op.key:
            raise InvalidArgumentError(f"store keys must be non-empty str, got {op.key!r}")
        doc_id = _doc_id(op.namespace, op.key)
        if op.value is None:  # LangGraph's delete
            self.engine.delete([doc_id], missing_ok=True, **self._in())
            return
        if not isinstance(op.value, dict):
            raise InvalidTypeError(f"store values must be dicts, got {type(op.value).__name__}")
        text, indexed = self._text(op.value, op.index)
        now = datetime.now(timezone.utc).isoformat()
        snap = self.engine.snapshot()
        # created_at survives an overwrite; the write itself is one engine upsert (old or new, never neither)
        created = snap.get([doc_id])[0].metadata.get("created_at", now) if doc_id in snap else now
        meta = {_MARK: True, "namespace": list(op.namespace), "key": op.key, "value": op.value,
                "created_at": created, "updated_at": now, "indexed": indexed}
        self.engine.upsert([text], ids=[doc_id], metadata=[meta], progress=False, **self._in())

    def _search(self, op: SearchOp, snap: Snapshot) -> list:
        prefix = tuple(op.namespace_prefix)
        flt = op.filter or None
        check_store_filter(flt)

        def admitted(doc: MemoryDocument) -> bool:
            m = doc.metadata
            return (_is_item(doc) and in_collection(doc, self.collection_name)
                    and tuple(m["namespace"])[:len(prefix)] == prefix
                    and (flt is None or all(store_value_matches(m["value"].get(k), v) for k, v in flt.items())))

        # no query (None or "") lists items in the order they were put, as LangGraph's InMemoryStore does
        query = check_text(op.query, "query") if op.query not in (None, "") else None
        if op.limit <= 0:
            return []
        if query:
            # offset + limit distinct items: an item stored in parts counts once (LangGraph's InMemoryStore
            # max-pools an item's vectors before offset and limit)
            routed = self.engine.retrieve(query, k=op.offset + op.limit, snapshot=snap, whole_texts=True,
                                          where=lambda d: admitted(d) and _is_indexed(d), **self._in())
            hits = [_item(d.metadata, SearchItem, score=float(d.score))
                    for d in _first_per_item(routed)[op.offset:op.offset + op.limit]]
            if len(hits) < op.limit:  # as InMemoryStore: unindexed items fill the rest, unscored
                rest = _in_put_order(_first_per_item(d for d in documents_of(snap, self.collection_name)
                                                     if admitted(d) and not _is_indexed(d)))
                hits += [_item(d.metadata, SearchItem, score=None) for d in rest[:op.limit - len(hits)]]
            return hits
        docs = _in_put_order(_first_per_item(d for d in documents_of(snap, self.collection_name) if admitted(d)))
        return [_item(d.metadata, SearchItem) for d in docs[op.offset:op.offset + op.limit]]

    def _list(self, op: ListNamespacesOp, snap: Snapshot) -> list:
        spaces = sorted({tuple(d.metadata["namespace"]) for d in documents_of(snap, self.collection_name)
                         if _is_item(d)})
        for cond in op.match_conditions or ():
            path = tuple(cond.path)

            def fits(ns):
                if len(ns) < len(path):
                    return False
                part = ns[:len(path)] if cond.match_type == "prefix" else ns[len(ns) - len(path):]
                return all(p == "*" or p == n for p, n in zip(path, part))
            spaces = [ns for ns in spaces if fits(ns)]
        if op.max_depth is not None:
            spaces = sorted({ns[:op.max_depth] for ns in spaces})
        return spaces[op.offset:op.offset + op.limit]

    def batch(self, ops: Iterable) -> list:
        results = []
        for op in ops:
            if isinstance(op, PutOp):
                self._put(op)
                results.append(None)
                continue
            snap = self.engine.snapshot()  # each read sees the puts before it in the batch
            if isinstance(op, GetOp):
                results.append(self._get(op, snap))
            elif isinstance(op, SearchOp):
                results.append(self._search(op, snap))
            elif isinstance(op, ListNamespacesOp):
                results.append(self._list(op, snap))
            else:
                raise InvalidTypeError(f"unknown store operation {type(op).__name__}")
        return results

    async def abatch(self, ops: Iterable) -> list:
        return await asyncio.to_thread(self.batch, list(ops))  # routing and encoding never block the event loop


__all__ = ["MSAStore"]
