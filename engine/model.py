"""An explicit decoder forward for the Llama family, reading a Hugging Face model's weights.

MSA needs things Hugging Face's cache and mask plumbing does not express: per-layer different key/value
lengths (each routing layer attends to its own selected documents), lower layers blind to memory,
document-local positions and pooled keys. So we own the forward (the gpt-fast way) and keep the HF model
only as a container of weights, config and rotary embedding, and as the reference in tests: our dense
forward must reproduce `AutoModelForCausalLM` logits.

Supported families share one block: RMSNorm -> q/k/v projections (Qwen2: with bias) -> (Qwen3: per-head
q_norm/k_norm) -> RoPE -> attention -> o_proj -> residual -> RMSNorm -> gated MLP -> residual.
"""

from __future__ import annotations

import json
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, UnsupportedModelError

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")




def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, S, D]; cos/sin: [B, S, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class LayerCapture:
    """What one layer hands to a capture callback (encoding and routing read these)."""

    layer: int
    h_norm: torch.Tensor  # [B, S, hidden] normalised layer input (what q/k/v and the router read)
    k: torch.Tensor  # [B, G, S, D] keys after norm and RoPE
    v: torch.Tensor  # [B, G, S, D]
    k_pre_rope: torch.Tensor  # [B, G, S, D] keys after k_norm (Qwen3) but before RoPE
    q_pre_rope: torch.Tensor  # [B, H, S, D]


@dataclass
class KVCache:
    """Key/value cache of up to `batch` sequences, in buffers allocated once (the gpt-fast way): a decode
    step writes one position in place and attends to a view, instead of concatenating the whole cache.

    Per layer l the buffers are [batch, G, capacity, D]; slot b holds first the fixed memory prefix of that
    layer (`memory[l]`: the pooled K̄/V̄ of the documents this layer selected in sparse mode, already rotated
    at their document-local positions; lower layers have none), then the sequence's own tokens. So the
    valid keys of slot b at layer l are [0, mem_len[l][b] + n_tokens[b]); a batched step masks the rest.

    `capacity`: positions per slot (memory + prompt + new tokens); 0 allocates what the first forward needs
    and doubles when full. `preallocated=False` is the reference path from before (one `torch.cat` of the
    whole cache per token and layer), kept for equivalence tests and benchmarks (MSA_KV_CACHE=cat).
    """

    n_layers: int
    memory: list = field(default_factory=list)  # per layer: None or (k [1,G,M,D], v [1,G,M,D]) of slot 0
    capacity: int = 0
    batch: int = 1
    preallocated: bool = True
    k: list = field(default_factory=list)  # per layer: [batch, G, capacity, D] (cat path: [1, G, T, D])
    v: list = field(default_factory=list)

    def __post_init__(self):
        if not self.memory:
            self.memory = [None] * self.n_layers
        self.k = [None] * self.n_layers
        self.v = [None] * self.n_layers
        self.n_tokens = [0] * self.batch  # own tokens cached per slot
        # memory prefix length per layer and slot; slot 0 takes the constructor's `memory`
        self.mem_len = [[0] * self.batch for _ in range(self.n_layers)]
        if self.preallocated:
            for layer, m in enumerate(self.memory):
                self.mem_len[layer][0] = 0 if m is None else int(m[0].shape[2])

    def length(self) -> int:
        """Own tokens cached in slot 0 (the single-sequence case)."""
        if not self.preallocated:
            return 0 if self.k[0] is None else self.k[0].shape[2]
        return self.n_tokens[0]

    def _allocate(self, layer: int, like: torch.Tensor, needed: int) -> None:
        _, G, _, D = like.shape
        cap = max(self.capacity, needed)
        self.k[layer] = like.new_zeros(self.batch, G, cap, D)
        self.v[layer] = like.new_zeros(self.batch, G, cap, D)
        m = self.memory[layer]
        if m is not None:  # the memory prefix goes first in slot 0, written once
            M = m[0].shape[2]
            self.k[layer][0, :, :M] = m[0][0]
            self.v[layer][0, :, :M] = m[1][0]

    def _grow(self, layer: int, needed: int) -> None:
        """Double the capacity of one layer's buffers (amortised O(1) per token when none was given)."""
        cap = max(needed, 2 * self.k[layer].shape[2])
        for bufs in (self.k, self.v):
            old = bufs[layer]
            new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
            new[:, :, :old.shape[2]] = old
            bufs[layer] = new
        self.capacity = max(self.capacity, cap)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store the new keys/values k, v [B, G, S, D] of slots 0..B-1 at layer `layer` and return
        (keys, values, key_valid): keys/values [B, G, T, D] views of the buffers, and key_valid [B, T]
        (True: a real key of that row) or None when every row's keys fill all T positions.
        Rows of different lengths (continuous batching) need S == 1."""
        B, _, S, _ = k.shape
        ends = [self.mem_len[layer][b] + self.n_tokens[b] for b in range(B)]
        T = max(ends) + S
        if self.k[layer] is None:
            self._allocate(layer, k, T)
        elif T > self.k[layer].shape[2]:
            self._grow(layer, T)
        kb, vb = self.k[layer], self.v[layer]
        if min(ends) == max(ends):
            kb[:B, :, ends[0]:ends[0] + S] = k
            vb[:B, :, ends[0]:ends[0] + S] = v
            return kb[:B, :, :T], vb[:B, :, :T], None
        if S != 1:
            raise InvalidArgumentError("rows of different lengths can only decode one token at a time; prefill "
                                       "each sequence alone and join it with KVCache.put")
        rows = torch.arange(B, device=k.device)
        at = torch.tensor(ends, device=k.device)
        kb[rows, :, at] = k[:, :, 0]  # [B, G, D] into each row's own next position
        vb[rows, :, at] = v[:, :, 0]
        key_valid = torch.arange(T, device=k.device)[None] <= at[:, None]  # [B, T]
        return kb[:B, :, :T], vb[:B, :, :T], key_valid

    def advance(self, rows: int, n: int) -> None:
        """After a forward: slots 0..rows-1 hold n more tokens each."""
        for b in range(rows):
            self.n_tokens[b] += n

    # -- slots (continuous batching): a request is prefilled alone, joins a free slot, leaves by compaction
    def put(self, slot: int, single: "KVCache", reserve: int = 0) -> None:
        """Copy a single-sequence cache (memory prefix and tokens of its slot 0) into `slot`, with room
        for at least `reserve` positions in that slot."""
        for layer in range(self.n_layers):
            n = single.mem_len[layer][0] + single.n_tokens[0]
            src_k, src_v = single.k[layer], single.v[layer]
            if self.k[layer] is None:
                self._allocate(layer, src_k, max(n, reserve))
            elif max(n, reserve) > self.k[layer].shape[2]:
                self._grow(layer, max(n, reserve))
            self.k[layer][slot, :, :n] = src_k[0, :, :n]
            self.v[layer][slot, :, :n] = src_v[0, :, :n]
            self.mem_len[layer][slot] = single.mem_len[layer][0]
        self.n_tokens[slot] = single.n_tokens[0]

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst` (keeps the live slots packed at 0..n-1 after one leaves, so a
        step's keys stay a view of the buffers)."""
        for layer in range(self.n_layers):
            n = self.mem_len[layer][src] + self.n_tokens[src]
            if self.k[layer] is not None:
                self.k[layer][dst, :, :n] = self.k[layer][src, :, :n]
                self.v[layer][dst, :, :n] = self.v[layer][src, :, :n]
            self.mem_len[layer][dst] = self.mem_len[layer][src]
        self.n_tokens[dst] = self.n_tokens[src]

    def clear(self, slot: int) -> None:
        self.n_tokens[slot] = 0
        for layer in range(self.n_layers):
            self.mem_len[layer][slot] = 0


class DecoderModel:
    """Our forward over a Hugging Face Llama-family model's modules (weights are shared, not copied)."""

    def __init__(self, hf_model, tokenizer, name: str = "model"):
        cfg = hf_model.config
        family = getattr(cfg, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model family {family!r} is not supported; supported families: {', '.join(SUPPORTED_FAMILIES)} "
                "(Llama incl. SmolLM2, Qwen2, Qwen3, Mistral)"
            )
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = cfg
        self.family = family
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        sliding = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if family == "mistral" and sliding:
            # We always attend fully; beyond the sliding window that would differ from the model.
            self.max_positions = min(self.max_positions, int(sliding))
        body = hf_model.model
        self.embed_tokens = body.embed_tokens
        self.layers = body.layers
        self.final_norm = body.norm
        self.lm_head = hf_model.lm_head
        self.rotary = body.rotary_emb
        for p in hf_model.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ identity
    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def config_hash(self) -> str:
        d = self.config.to_dict()
        keep = {k: d.get(k) for k in sorted(d) if k not in ("_name_or_path", "transformers_version", "torch_dtype",
                                                          "dtype", "architectures", "quantization_config")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def tokenizer_hash(self) -> str:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ pieces
    def rope(self, positions: torch.Tensor):
        """positions [B, S] -> cos, sin [B, S, D] (the model's own rotary embedding, scaling included)."""
        dummy = torch.empty(0, device=self.device, dtype=torch.float32)
        cos, sin = self.rotary(dummy, positions.to(self.device))
        return cos.to(self.dtype), sin.to(self.dtype)

    def project_qkv(self, layer_idx: int, h_norm: torch.Tensor):
        """h_norm [B, S, hidden] -> q [B, H, S, D], k [B, G, S, D], v [B, G, S, D], all before RoPE."""
        attn = self.layers[layer_idx].self_attn
        B, S, _ = h_norm.shape
        q = attn.q_proj(h_norm).view(B, S, self.n_heads, self.head_dim)
        k = attn.k_proj(h_norm).view(B, S, self.n_kv_heads, self.head_dim)
        v = attn.v_proj(h_norm).view(B, S, self.n_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head's dims, before RoPE
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: Optional[KVCache] = None,
        capture: Optional[Callable[[LayerCapture], None]] = None,
        last_layer: Optional[int] = None,
        key_padding: Optional[torch.Tensor] = None,
        logits: str = "last",
    ) -> torch.Tensor:
        """One causal forward.

        ids, positions: [B, S]. With `cache`, the new tokens also attend to the cache's memory prefix of
        each layer (all of it) and to earlier cached tokens, and their K/V are appended to the cache.
        `capture` is called per layer; `last_layer` stops after that layer (encoding needs nothing above
        the last routing layer) and then returns None. `key_padding` [B, S] True marks real tokens (only
        needed when padding is on the left; right padding is harmless under a causal mask).
        logits: "last" -> [B, vocab] of the last position, "all" -> [B, S, vocab], "none" -> hidden [B, S, hidden].
        """
        B, S = ids.shape
        x = self.embed_tokens(ids.to(self.device))
        cos, sin = self.rope(positions)
        n_run = self.n_layers if last_layer is None else last_layer + 1
        causal = torch.ones(S, S, dtype=torch.bool, device=self.device).tril()
        for i in range(n_run):
            layer = self.layers[i]
            h = layer.input_layernorm(x)
            q, k_pre, v = self.project_qkv(i, h)
            q_rot = apply_rope(q, cos, sin)
            k = apply_rope(k_pre, cos, sin)
            if capture is not None:
                capture(LayerCapture(i, h, k, v, k_pre, q))
            keys, values, mask, key_valid = k, v, causal, None
            if cache is not None and not cache.preallocated:  # the reference path: concatenate per token
                past = [t for t in (cache.memory[i], (cache.k[i], cache.v[i]) if cache.k[i] is not None else None) if t]
                if past:
                    keys = torch.cat([p[0] for p in past] + [k], dim=2)
                    values = torch.cat([p[1] for p in past] + [v], dim=2)
                    n_past = keys.shape[2] - S
                    mask = torch.cat([torch.ones(S, n_past, dtype=torch.bool, device=self.device), causal], dim=1)
                cache.k[i] = k if cache.k[i] is None else torch.cat([cache.k[i], k], dim=2)
                cache.v[i] = v if cache.v[i] is None else torch.cat([cache.v[i], v], dim=2)
            elif cache is not None:
                keys, values, key_valid = cache.update(i, k, v)  # [B, G, T, D] views; T = past + S
                n_past = keys.shape[2] - S
                if n_past:
                    # new tokens see every memory chunk and every earlier token, and are causal among
                    # themselves; one new token sees all of them (no mask)
                    mask = None if S == 1 else torch.cat(
                        [torch.ones(S, n_past, dtype=torch.bool, device=self.device), causal], dim=1)
                if key_valid is not None:  # rows of a batch of different lengths: [B, 1, S, T]
                    mask = key_valid[:, None, None, :] if mask is None else mask[None, None] & key_valid[:, None, None, :]
            attn_mask = mask
            if key_padding is not None:
                base = torch.ones(S, keys.shape[2], dtype=torch.bool, device=self.device) if mask is None else mask
                base = base[None, None] if base.dim() == 2 else base
                attn_mask = base & key_padding.to(self.device)[:, None, None, -keys.shape[2]:]
                # a fully masked row (a padding query) would give NaN; let it see itself
                attn_mask = attn_mask | torch.eye(S, keys.shape[2], dtype=torch.bool, device=self.device)[None, None]
            gqa = self.n_heads != self.n_kv_heads
            if attn_mask is None:  # one new token attending to all cached keys
                out = F.scaled_dot_product_attention(q_rot, keys, values, enable_gqa=gqa)
            elif attn_mask is causal:  # no memory, no past, no padding: the fused causal kernel, no mask tensor
                out = F.scaled_dot_product_attention(q_rot, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=attn_mask, enable_gqa=gqa)
            out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
            x = x + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if cache is not None and cache.preallocated:
            cache.advance(B, S)
        if last_layer is not None and last_layer < self.n_layers - 1:
            return None
        x = self.final_norm(x)
        if logits == "none":
            return x
        if logits == "last":
            return self.lm_head(x[:, -1]).float()
        return self.lm_head(x).float()


def read_model_family(path: str) -> str:
    """The `model_type` in a model folder's config.json, read as plain JSON before any transformers call:
    an unsupported family, or a folder that asks for its own code (`auto_map`), is refused before
    transformers could import anything from the folder."""
    cfg_path = os.path.join(path, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UnsupportedModelError(f"{path} has no config.json: it is not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnsupportedModelError(f"{cfg_path} is not valid JSON ({e})") from None
    family = raw.get("model_type") if isinstance(raw, dict) else None
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model family {family!r} in {path} is not supported; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama incl. SmolLM2, Qwen2, Qwen3, Mistral)")
    if raw.get("auto_map"):
        raise UnsupportedModelError(f"{cfg_path} asks for custom model code (auto_map); msa-plugins never runs code "
                                    "from a model folder: use a model of a supported family without auto_map")
    return family


def load_hf_model(path: str, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """Load a local Hugging Face causal LM folder (weights, config, tokenizer). Never touches a hub and
    never runs code from the folder (`trust_remote_code=False`, family checked first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise PathNotFoundError(f"model folder {path!r} does not exist; pass a local Hugging Face model folder, "
                                "a .gguf file, or nothing for the embedded default")
    read_model_family(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if getattr(config, "model_type", None) not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model family {getattr(config, 'model_type', None)!r} in {path} is not supported; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)} (Llama incl. SmolLM2, Qwen2, Qwen3, Mistral)")
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, trust_remote_code=False)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer
