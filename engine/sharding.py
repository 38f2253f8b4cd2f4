"""Memory-parallel routing for a serving process: rank 0 holds the whole memory, every rank routes a shard.

`engine.distributed` is the routing math (each rank scores its own documents, one exchange of k candidates
per rank gives the exact global top-k). This module is the plumbing that lets a server use it: rank 0 (the
process that owns the `MSAEngine` and answers HTTP) ships each worker rank its shard of a memory snapshot,
and for every question broadcasts the routing queries; all ranks then run `sharded_route_topk` together
and every rank gets the selections single-process routing gives.

Exactness: every rank scores the same float32 queries against the same keys, and the merge uses the same
total order, so the selected documents (layer-mean and per layer) are those of one process. The scores
agree to fp32 rounding, not always bit for bit: a BLAS (MKL here) may sum the matmul over a shard's
width in another order than over the whole bank's (a few ULP), so two documents whose scores are that
close (~1e-7 relative) can swap places, as they can between two thread counts of one process.

Sharding rule (`shard_bounds`): a snapshot of N documents (bank rows) and C chunks is cut into `world`
contiguous blocks of whole documents; block r starts at the first document that starts at or after chunk
round(r * C / world), so each rank scores about C / world chunks (routing cost is per chunk) and a block's
chunks are one slice of the keys. The global id of a document is its bank row, so the exchange's order
"higher score, then lower global id" is single-process routing's "higher score, then lower row".

Protocol. Rank 0 drives and the worker ranks follow in `serve_worker`. Each exchange is one command
object broadcast from rank 0, then the tensors it announces:
    ("shard", slot, layout)   point-to-point sends of each worker's slice of keys (as bytes) and chunk rows
    ("route", slot, meta)     broadcast of the float32 queries [L, T, G*D] (and an allow mask [N] uint8),
                              then `sharded_route_topk` on every rank
    ("drop", slot)            forget a memory's shard
    ("ping",)                 keeps idle workers inside the collective timeout
    ("stop",)                 workers return
One lock on rank 0 serialises the commands, so every rank runs the same sequence of collectives; all
that may fail on rank 0 (shapes, masks) is computed before a command goes out. A slot is one memory
(one engine): workers keep the current shard of each slot, and rank 0 re-ships a slot when the snapshot
it routes against is not the one it shipped last (snapshots are immutable; rank 0 keeps a reference, so
identity is a version). Content (texts, pooled K̄/V̄) is not sharded in this version: rank 0 holds it all,
so the selections need no `fetch_content`.

Limits: collectives run over the process group's backend as given (tested with gloo on CPU); worker ranks
route on their `device` (default CPU); identical selections need the same scoring backend on every rank
(the Triton kernel and PyTorch may differ in the last bit). A worker that dies leaves rank 0 waiting
until the group's timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import InvalidArgumentError
from .bank import BankState
from .distributed import sharded_route_topk
from .routing import Routing, allow_mask

logger = logging.getLogger(__name__)


def shard_bounds(doc_start: torch.Tensor, n_chunks: int, world: int) -> list:
    """[(row0, row1, chunk0, chunk1)] per rank: contiguous blocks of whole documents, balanced by chunks.

    doc_start: [N + 1] first chunk of each row (CSR offsets, as `BankState.doc_start`).
    """
    starts = doc_start.to("cpu", torch.int64)
    N = int(starts.numel()) - 1
    rows = [0]
    for r in range(1, world):
        target = round(r * n_chunks / world)
        # documents starting before the target chunk belong to earlier blocks
        rows.append(max(rows[-1], int(torch.searchsorted(starts[:N], target, side="left"))))
    rows.append(N)
    return [(rows[r], rows[r + 1], int(starts[rows[r]]), int(starts[rows[r + 1]])) for r in range(world)]


@dataclass
class _Shard:
    """One rank's part of a memory snapshot: documents [row0, row1) and their chunks."""
    row0: int
    row1: int
    keys: torch.Tensor  # [L, c, G*D] routing keys of the block's chunks
    keys_scale: Optional[torch.Tensor]  # [L, c, G] for int8 keys
    chunk_doc: torch.Tensor  # [c] local row (0 .. row1 - row0) of each chunk
    gids: torch.Tensor  # [row1 - row0] int64 global id (bank row) of each local row

    def route(self, q, k, mask, group, backend, doc_score):
        allow = None if mask is None else mask[self.row0:self.row1].to(torch.bool)
        return sharded_route_topk(q.to(self.keys.device), self.keys, self.chunk_doc, self.gids, k, group=group,
                                  backend=backend, keys_scale=self.keys_scale, allow=allow, doc_score=doc_score)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.rpartition(".")[2])


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Any dtype as flat uint8 (the backend needs no support for int8 / bfloat16 keys)."""
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8)


def _global_rank(group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


def _broadcast_command(cmd, group) -> tuple:
    box = [cmd]
    dist.broadcast_object_list(box, src=_global_rank(group, 0), group=group)
    return box[0]


def _route_tensors(meta: dict, q: Optional[torch.Tensor], mask: Optional[torch.Tensor], group):
    """Rank 0 sends (q, mask); the others receive them into buffers shaped by `meta`."""
    src = _global_rank(group, 0)
    if q is None:
        q = torch.empty(meta["q_shape"], dtype=torch.float32)
        mask = torch.empty(meta["n_rows"], dtype=torch.uint8) if meta["allow"] else None
    dist.broadcast(q, src=src, group=group)
    if mask is not None:
        dist.broadcast(mask, src=src, group=group)
    return q, mask


class ShardGroup:
    """Rank 0's side of a memory-parallel process group: the command channel to the worker ranks.

    Build it after `torch.distributed` is initialised (rank 0 of `group`), or with `spawn` / `from_env`.
    `router()` gives one `ShardedRouter` per memory; `stop()` ends the workers (and what `spawn` started).
    """

    def __init__(self, group=None, processes=(), heartbeat_s: float = 60.0, owns_group: bool = False):
        if dist.get_rank(group) != 0:
            raise InvalidArgumentError("ShardGroup runs on rank 0; other ranks run serve_worker(group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.processes = list(processes)
        self.lock = threading.Lock()
        self._owns_group = owns_group
        self._slots = 0
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeat = None
        if self.world > 1 and heartbeat_s:
            self._heartbeat = threading.Thread(target=self._ping, args=(heartbeat_s,), daemon=True,
                                               name="msa-shard-heartbeat")
            self._heartbeat.start()

    # ---------------------------------------------------------------- starting
    @classmethod
    def spawn(cls, nproc: int, timeout_s: float = 600.0, heartbeat_s: float = 60.0) -> "ShardGroup":
        """Start nproc - 1 worker processes on this machine (gloo over loopback) and become rank 0."""
        if nproc < 1:
            raise InvalidArgumentError(f"nproc must be at least 1, got {nproc}")
        if dist.is_initialized():
            raise InvalidArgumentError("torch.distributed is already initialised in this process; build "
                                       "ShardGroup(group) on it instead of spawning")
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_worker_main, args=(r, nproc, port, timeout_s), daemon=True,
                             name=f"msa-shard-{r}") for r in range(1, nproc)]
        for p in procs:
            p.start()
        try:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=nproc,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception:
            for p in procs:
                p.kill()
            raise
        logger.info("memory-parallel routing over %d processes (gloo, port %d)", nproc, port)
        return cls(None, procs, heartbeat_s=heartbeat_s, owns_group=True)

    @classmethod
    def from_env(cls, timeout_s: float = 600.0, heartbeat_s: float = 60.0) -> "ShardGroup":
        """Rank 0 under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set); the other ranks call
        `worker_from_env()`."""
        made = not dist.is_initialized()
        if made:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(None, heartbeat_s=heartbeat_s, owns_group=made)

    def router(self) -> "ShardedRouter":
        with self.lock:
            self._slots += 1
            return ShardedRouter(self, self._slots)

    # ---------------------------------------------------------------- commands (under self.lock)
    def _command(self, cmd) -> None:
        if self._stopped.is_set():
            raise RuntimeError("the memory-parallel group has been stopped")
        _broadcast_command(cmd, self.group)
        self._last = time.monotonic()

    def _ping(self, every: float) -> None:
        while not self._stopped.wait(every / 4):
            if time.monotonic() - self._last >= every and self.lock.acquire(blocking=False):
                try:
                    if not self._stopped.is_set():
                        self._command(("ping",))
                except Exception as e:  # a broken group: routing calls will report it
                    logger.warning("memory-parallel heartbeat failed: %s", e)
                    return
                finally:
                    self.lock.release()

    def _ship(self, slot: int, state: BankState) -> _Shard:
        """Send each worker its block of `state`; returns rank 0's own block (views, no copy)."""
        bounds = shard_bounds(state.doc_start, state.n_chunks, self.world)
        keys, scale = state.keys_r, state.keys_r_scale
        L, _, GD = keys.shape
        layout = {"bounds": bounds, "L": L, "GD": GD, "dtype": str(keys.dtype),
                  "G": None if scale is None else int(scale.shape[2])}
        self._command(("shard", slot, layout))
        for r in range(1, self.world):
            row0, row1, c0, c1 = bounds[r]
            if c1 > c0:  # an empty block sends nothing (both sides know it from the layout)
                parts = [keys[:, c0:c1], state.chunk_doc[c0:c1] - row0] + \
                    ([scale[:, c0:c1]] if scale is not None else [])
                for t in parts:
                    dist.send(_as_bytes(t), dst=_global_rank(self.group, r), group=self.group)
        row0, row1, c0, c1 = bounds[0]
        return _Shard(row0, row1, keys[:, c0:c1], None if scale is None else scale[:, c0:c1],
                      state.chunk_doc[c0:c1] - row0, torch.arange(row0, row1, dtype=torch.int64))

    def stop(self, timeout: float = 30.0) -> None:
        """Tell the workers to return, join what `spawn` started, and end the process group it made."""
        with self.lock:
            if self._stopped.is_set():
                return
            try:
                if self.world > 1:
                    _broadcast_command(("stop",), self.group)
            finally:
                self._stopped.set()
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                logger.warning("memory-parallel worker %s did not stop; killing it", p.name)
                p.kill()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "ShardGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ShardedRouter:
    """`engine.routing.route` for one memory, scored by every rank of a `ShardGroup` (hand it to
    `MSAEngine.use_sharded_routing`). Returns the same `Routing`: ids, scores and per-layer selections."""

    def __init__(self, shards: ShardGroup, slot: int):
        self.shards, self.slot = shards, slot
        self._state: Optional[BankState] = None  # the snapshot the workers hold (kept alive: its id is a version)
        self._own: Optional[_Shard] = None

    def route(self, q_fold: torch.Tensor, state: BankState, routing_layers: list, k: int, allow_ids=None,
              backend: str = "auto", doc_score: str = "maxmax") -> Routing:
        L = len(routing_layers)
        if len(state) == 0:  # decided here, before any command: the workers are not involved
            return Routing([], [], [], {layer: ([], []) for layer in routing_layers}, torch.zeros(L, 0, dtype=torch.long))
        q = q_fold.detach().to("cpu", torch.float32).contiguous()  # every rank scores these exact queries
        mask = allow_mask(state, allow_ids)
        mask = None if mask is None else mask.to(torch.uint8)
        meta = {"q_shape": tuple(q.shape), "n_rows": len(state), "allow": mask is not None, "k": int(k),
                "backend": backend, "doc_score": doc_score}
        group = self.shards.group
        with self.shards.lock:
            if self._state is not state:
                self._own = self.shards._ship(self.slot, state)
                self._state = state
            self.shards._command(("route", self.slot, meta))
            q, mask = _route_tensors(meta, q, mask, group)
            layer_s, layer_rows, mean_s, mean_rows = self._own.route(q, k, mask, group, backend, doc_score)
        layer_rows, mean_rows = layer_rows.cpu(), mean_rows.cpu()
        layer_s, mean_s = layer_s.cpu(), mean_s.cpu()
        per_layer = {layer: ([state.ids[int(r)] for r in layer_rows[i]], layer_s[i].tolist())
                     for i, layer in enumerate(routing_layers)}
        rows = mean_rows.tolist()
        return Routing([state.ids[r] for r in rows], mean_s.tolist(), rows, per_layer, layer_rows)

    def close(self) -> None:
        """Free this memory's shard on the workers."""
        with self.shards.lock:
            if self._state is not None and not self.shards._stopped.is_set():
                self.shards._command(("drop", self.slot))
            self._state = self._own = None


# -------------------------------------------------------------------- worker ranks
def _recv_shard(layout: dict, rank: int, group, device) -> _Shard:
    row0, row1, c0, c1 = layout["bounds"][rank]
    L, GD, G, dtype = layout["L"], layout["GD"], layout["G"], _dtype(layout["dtype"])
    c = c1 - c0

    def recv(shape, dt):
        t = torch.empty(shape, dtype=dt)
        if t.numel():
            buf = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
            dist.recv(buf, src=_global_rank(group, 0), group=group)
            t = buf.view(dt).view(shape)
        return t.to(device)

    keys = recv((L, c, GD), dtype)
    chunk_doc = recv((c,), torch.int64)
    scale = recv((L, c, G), torch.float32) if G is not None else None
    return _Shard(row0, row1, keys, scale, chunk_doc, torch.arange(row0, row1, dtype=torch.int64, device=device))


def serve_worker(group=None, device="cpu") -> None:
    """A worker rank: follow rank 0's commands (see the module doc) until it sends "stop"."""
    rank = dist.get_rank(group)
    shards: dict = {}
    while True:
        cmd = _broadcast_command(None, group)
        op = cmd[0]
        if op == "stop":
            return
        if op == "shard":
            shards[cmd[1]] = _recv_shard(cmd[2], rank, group, device)
        elif op == "drop":
            shards.pop(cmd[1], None)
        elif op == "route":
            meta = cmd[2]
            q, mask = _route_tensors(meta, None, None, group)
            shards[cmd[1]].route(q, meta["k"], mask, group, meta["backend"], meta["doc_score"])
        elif op != "ping":
            raise RuntimeError(f"unknown memory-parallel command {op!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world: int, port: int, timeout_s: float) -> None:
    """Entry point of a process started by `ShardGroup.spawn`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        serve_worker()
    finally:
        dist.destroy_process_group()


def torchrun_rank() -> Optional[int]:
    """This process's rank under torchrun (RANK and WORLD_SIZE set, world > 1), else None."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"])
    return None


def worker_from_env(timeout_s: float = 600.0, device="cpu") -> None:
    """A non-zero rank under torchrun: join the group from the environment and serve until rank 0 stops."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        serve_worker(device=device)
    finally:
        dist.destroy_process_group()


__all__ = ["ShardGroup", "ShardedRouter", "serve_worker", "shard_bounds", "torchrun_rank", "worker_from_env"]
