"""Memory parallel routing (engine.distributed) on 2 CPU processes with gloo vs one process holding all.

Two banks: one with small-integer keys and queries, where every dot product is exact in fp32 whatever
the matmul's summation order (so scores must match bit for bit and the many ties exercise the
"higher score, then lower global id" rule across ranks), and one with random unit keys (ids must match,
scores to fp32 rounding: a BLAS may sum a different-sized matmul in another order).
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from msa_plugins.kernels import doc_scores, topk_docs

WORLD = 2
KS = (1, 5, 40)                                  # 40 > number of valid documents


def make_bank(kind: str, seed: int = 0):
    """Global bank (rows = global document ids) and a sharding of whole documents over WORLD ranks."""
    gen = torch.Generator().manual_seed(seed)
    L, T, GD, n_docs = 3, 4, 8, 23
    counts = torch.randint(0, 5, (n_docs,), generator=gen)          # some documents own no chunk
    chunk_doc = torch.repeat_interleave(torch.arange(n_docs), counts)
    C = int(chunk_doc.numel())
    if kind == "exact":
        q = torch.randint(-1, 2, (L, T, GD), generator=gen).float()
        keys = torch.randint(-1, 2, (L, C, GD), generator=gen).float()
    else:
        q = torch.randn(L, T, GD, generator=gen) / GD
        keys = torch.nn.functional.normalize(torch.randn(L, C, GD, generator=gen), dim=-1)
    owner_order = torch.randperm(n_docs, generator=gen)              # interleaved, unsorted shards
    shards = []
    for r in range(WORLD):
        gids = owner_order[r::WORLD]
        rows = [torch.nonzero(chunk_doc == g).flatten() for g in gids.tolist()]
        local_chunks = torch.cat(rows)
        local_chunk_doc = torch.repeat_interleave(torch.arange(len(gids)), torch.tensor([len(x) for x in rows]))
        shards.append((keys[:, local_chunks], local_chunk_doc, gids))
    return q, keys, chunk_doc, n_docs, shards


def _worker(rank: int, port: int, out_dir: str):
    from msa_plugins.engine.distributed import fetch_content, sharded_route, sharded_route_aggregated
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in ("exact", "random"):
            q, _, _, _, shards = make_bank(kind)
            local_keys, local_chunk_doc, gids = shards[rank]
            for k in KS:
                results[(kind, "layers", k)] = sharded_route(q, local_keys, local_chunk_doc, gids, k)
                results[(kind, "mean", k)] = sharded_route_aggregated(q, local_keys, local_chunk_doc, gids, k)
            _, ids = results[(kind, "layers", 5)]
            content = [(f"doc-{g}", torch.full((2,), float(g))) for g in gids.tolist()]
            results[(kind, "content")] = fetch_content(ids[0], gids, content)
            results[(kind, "content-missing")] = fetch_content([10_000], gids, content)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["exact", "random"])
def test_sharded_route_equals_single_process(rank_results, kind):
    q, keys, chunk_doc, n_docs, _ = make_bank(kind)
    full = doc_scores(q, keys, chunk_doc, n_docs)
    n_valid = int(torch.isfinite(full[0]).sum())
    if kind == "exact":
        assert (full[torch.isfinite(full)] == full[torch.isfinite(full)].round()).all()
        assert full.unique().numel() < full.numel() // 2                # plenty of ties to break
    for k in KS:
        expected = {"layers": topk_docs(full, k), "mean": topk_docs(full.mean(0), k)}
        for mode, (ref_s, ref_i) in expected.items():
            assert ref_i.shape[-1] == min(k, n_valid)
            for rank, res in enumerate(rank_results):
                s, i = res[(kind, mode, k)]
                assert torch.equal(i, ref_i), (kind, mode, k, rank, i, ref_i)
                if kind == "exact":
                    assert torch.equal(s, ref_s)
                else:
                    assert torch.allclose(s, ref_s, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["exact", "random"])
def test_fetch_content_from_owner_ranks(rank_results, kind):
    for res in rank_results:
        _, ids = res[(kind, "layers", 5)]
        got = res[(kind, "content")]
        assert [name for name, _ in got] == [f"doc-{g}" for g in ids[0].tolist()]
        assert all(torch.equal(row, torch.full((2,), float(g))) for (_, row), g in zip(got, ids[0].tolist()))
        assert res[(kind, "content-missing")] == [None]
    # the selected documents live on both ranks, so the exchange really crossed processes
    _, _, _, _, shards = make_bank(kind)
    owners = {g: r for r, (_, _, gids) in enumerate(shards) for g in gids.tolist()}
    assert len({owners[g] for g in rank_results[0][(kind, "layers", 5)][1][0].tolist()}) == WORLD
