"""Document-wise encoding into chunk-pooled memory, and the question's routing queries (MSA sections 2, 3).

Each document is its own sequence in the batch (no cross-document attention), positions 0..n-1.
Right padding is harmless: under a causal mask a real token never sees a later padding token, and
pooling skips padding. On every routing layer we keep, per chunk of P tokens (the last may be short),
the fp32 mean of K (after norm and RoPE) and V; and per chunk of P_R tokens (P_R = P unless
`routing_chunk_size` says otherwise) the mean of the routing key K_R and optionally of the normalised layer
input H, from which K_R can be recomputed for any later router (pooling commutes with a linear map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..kernels.routing import fold_queries
from ..errors import InvalidArgumentError
from .model import DecoderModel, LayerCapture


def pool_chunks(x: torch.Tensor, P: int) -> torch.Tensor:
    """Mean over consecutive chunks of P rows, partial last chunk, fp32 accumulation.

    x: [S, *rest] -> [ceil(S / P), *rest] (float32).
    """
    S = x.shape[0]
    C = (S + P - 1) // P
    x = x.to(torch.float32)
    pad = C * P - S
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])], dim=0)
    sums = x.view(C, P, *x.shape[1:]).sum(dim=1)  # [C, *rest]
    counts = torch.full((C,), float(P), device=x.device)
    counts[-1] = P - pad
    return sums / counts.view(C, *([1] * (x.dim() - 1)))


def normalise_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Unit-normalise each head's slice of the last dim: [..., n_heads * D]."""
    shape = x.shape
    return F.normalize(x.reshape(*shape[:-1], n_heads, -1).float(), dim=-1).reshape(shape)


@dataclass
class EncodedDocument:
    n_tokens: int
    keys_r: torch.Tensor  # [L, C_R, G*D]  routing keys, one per P_R tokens (unit-normalised per head for cosine)
    keys: torch.Tensor  # [L, C, G*D]  K̄ after RoPE at document-local positions, one per P tokens
    values: torch.Tensor  # [L, C, G*D]
    inputs: Optional[torch.Tensor]  # [L, C_R, hidden] pooled normalised layer inputs (routing chunks), when kept


def length_batches(lengths: list, batch_tokens: int) -> list:
    """Indices of sequences grouped into padded batches of at most `batch_tokens` (longest length x batch size),
    longest first, so that each batch pads little. A sequence longer than `batch_tokens` gets a batch alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and max(cur_max, n) * (len(cur) + 1) > batch_tokens:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    return batches


class Encoder:
    """Encodes documents into chunk-pooled memory and questions into folded routing queries."""

    def __init__(self, model: DecoderModel, routing_layers: list, chunk_size: int, router, score: str = "cosine",
                 keep_inputs: bool = False, batch_tokens: int = 4096, store_dtype: Optional[torch.dtype] = None,
                 routing_chunk_size: Optional[int] = None):
        self.model = model
        self.routing_layers = list(routing_layers)
        self.P = int(chunk_size)  # content chunks (K̄, V̄)
        self.P_R = int(routing_chunk_size or chunk_size)  # routing chunks (K̄_R and the kept inputs)
        self.router = router
        self.score = score
        self.keep_inputs = keep_inputs
        self.batch_tokens = batch_tokens
        self.store_dtype = store_dtype or (torch.float32 if model.device.type == "cpu" else torch.bfloat16)

    def routing_keys_from_inputs(self, layer: int, pooled_inputs: torch.Tensor, router=None) -> torch.Tensor:
        """pooled H [C, hidden] -> K̄_R [C, G*D] for `router` (default: the current one; trained routers
        only, since they are linear)."""
        k = (router or self.router).key(layer, pooled_inputs.to(self.model.device).float())  # [C, G, D]
        k = k.reshape(k.shape[0], -1).float()
        return normalise_heads(k, self.model.n_kv_heads) if self.score == "cosine" else k

    # ------------------------------------------------------------------ documents
    def encode(self, token_lists: list, progress: bool = True, desc: str = "encoding") -> list:
        """token_lists: list of token-id lists -> list of EncodedDocument (same order)."""
        out = [None] * len(token_lists)
        batches = length_batches([len(t) for t in token_lists], self.batch_tokens)
        total = sum(len(t) for t in token_lists)
        with tqdm(total=total, desc=desc, unit="tok", disable=not progress or total == 0, leave=False) as bar:
            for batch in batches:
                for i, enc in zip(batch, self._encode_batch([token_lists[i] for i in batch])):
                    out[i] = enc
                bar.update(sum(len(token_lists[i]) for i in batch))
        return out

    @torch.inference_mode()
    def _encode_batch(self, token_lists: list) -> list:
        m = self.model
        B, S = len(token_lists), max(len(t) for t in token_lists)
        pad_id = 0
        ids = torch.full((B, S), pad_id, dtype=torch.long)
        for b, t in enumerate(token_lists):
            ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        positions = torch.arange(S)[None].expand(B, S)  # document-wise RoPE: every document starts at 0
        lengths = [len(t) for t in token_lists]
        per_layer = {}  # layer -> (keys_r [B] list, keys, values, inputs)
        layer_set = set(self.routing_layers)

        def capture(c: LayerCapture):
            if c.layer not in layer_set:
                return
            G_D = m.n_kv_heads * m.head_dim
            k = c.k.transpose(1, 2).reshape(B, S, G_D)  # [B, G, S, D] -> [B, S, G*D]
            v = c.v.transpose(1, 2).reshape(B, S, G_D)
            kpre = c.k_pre_rope.transpose(1, 2).reshape(B, S, G_D)
            rows = []
            for b, n in enumerate(lengths):
                h_pool = pool_chunks(c.h_norm[b, :n], self.P_R)  # [C_R, hidden]
                if self.router.kind == "qk":
                    kr = pool_chunks(kpre[b, :n], self.P_R)  # k_norm (Qwen3) is not linear: pool after projecting
                    if self.score == "cosine":
                        kr = normalise_heads(kr, m.n_kv_heads)
                else:
                    kr = self.routing_keys_from_inputs(c.layer, h_pool)
                rows.append((kr, pool_chunks(k[b, :n], self.P), pool_chunks(v[b, :n], self.P),
                             h_pool if self.keep_inputs else None))
            per_layer[c.layer] = rows

        m.forward(ids, positions, capture=capture, last_layer=max(self.routing_layers))
        docs = []
        sd = self.store_dtype
        for b, n in enumerate(lengths):
            parts = [per_layer[l][b] for l in self.routing_layers]
            docs.append(EncodedDocument(
                n_tokens=n,
                keys_r=torch.stack([p[0] for p in parts]).to(sd),
                keys=torch.stack([p[1] for p in parts]).to(sd),
                values=torch.stack([p[2] for p in parts]).to(sd),
                inputs=torch.stack([p[3] for p in parts]).to(sd) if self.keep_inputs else None,
            ))
        return docs

    # ------------------------------------------------------------------ questions
    @torch.inference_mode()
    def question_states(self, prompt_ids: list, question_mask: list):
        """Normalised layer inputs (and q before RoPE) of the question's own tokens on the routing layers.

        The question is run alone (no memory), positions 0..T-1: routing queries depend on the question
        only, so one routing pass serves every generation mode and equals what a router is trained on.
        Returns (h [L, Tq, hidden], q_pre_rope [L, H, Tq, D]) for the tokens where question_mask is True.
        """
        m = self.model
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        positions = torch.arange(len(prompt_ids))[None]
        sel = torch.tensor(question_mask, dtype=torch.bool, device=m.device)
        if not bool(sel.any()):
            raise InvalidArgumentError("the question has no tokens to route with; ask with words the tokenizer keeps")
        hs, qs = {}, {}
        layer_set = set(self.routing_layers)

        def capture(c: LayerCapture):
            if c.layer in layer_set:
                hs[c.layer] = c.h_norm[0, sel]
                qs[c.layer] = c.q_pre_rope[0][:, sel]

        m.forward(ids, positions, capture=capture, last_layer=max(self.routing_layers))
        return (torch.stack([hs[l] for l in self.routing_layers]),
                torch.stack([qs[l] for l in self.routing_layers]))

    def routing_queries(self, prompt_ids: list, question_mask: list, router=None) -> torch.Tensor:
        """-> q_fold [L, Tq, G*D] (float32): the head-folded routing queries of the question tokens, by `router`
        (default: the encoder's; routing passes the router that keyed the snapshot it routes over)."""
        router = router or self.router
        h, q_pre = self.question_states(prompt_ids, question_mask)
        q = torch.stack([router.query(layer, h[i], q_pre_rope=q_pre[i])  # [Tq, H, D] per layer
                         for i, layer in enumerate(self.routing_layers)])  # [L, Tq, H, D]
        return fold_queries(q, self.model.n_kv_heads, self.score)
