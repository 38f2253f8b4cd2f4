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

from ..errors import UnsupportedModelError

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
    """Key/value cache of one sequence (batch 1) for generation.

    `memory[l]` is the fixed prefix of layer l: the pooled K̄/V̄ of the documents this layer selected
    (sparse mode), already rotated at their document-local positions. It never grows; lower layers
    have none. `k[l]`/`v[l]` hold the sequence's own tokens and grow by one per decoded token.
    """

    n_layers: int
    memory: list = field(default_factory=list)  # per layer: None or (k [1,G,M,D], v [1,G,M,D])
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def __post_init__(self):
        if not self.memory:
            self.memory = [None] * self.n_layers
        self.k = [None] * self.n_layers
        self.v = [None] * self.n_layers

    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


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
            keys, values, mask = k, v, causal
            if cache is not None:
                past = [t for t in (cache.memory[i], (cache.k[i], cache.v[i]) if cache.k[i] is not None else None) if t]
                if past:
                    keys = torch.cat([p[0] for p in past] + [k], dim=2)
                    values = torch.cat([p[1] for p in past] + [v], dim=2)
                    n_past = keys.shape[2] - S
                    # new tokens see every memory chunk and every earlier token, and are causal among themselves
                    mask = torch.cat([torch.ones(S, n_past, dtype=torch.bool, device=self.device), causal], dim=1)
                cache.k[i] = k if cache.k[i] is None else torch.cat([cache.k[i], k], dim=2)
                cache.v[i] = v if cache.v[i] is None else torch.cat([cache.v[i], v], dim=2)
            attn_mask = mask
            if key_padding is not None:
                attn_mask = mask[None, None] & key_padding.to(self.device)[:, None, None, -keys.shape[2]:]
                # a fully masked row (a padding query) would give NaN; let it see itself
                attn_mask = attn_mask | torch.eye(S, keys.shape[2], dtype=torch.bool, device=self.device)[None, None]
            gqa = self.n_heads != self.n_kv_heads
            if attn_mask is causal:  # no memory, no past, no padding: the fused causal kernel, no mask tensor
                out = F.scaled_dot_product_attention(q_rot, keys, values, is_causal=True, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=attn_mask, enable_gqa=gqa)
            out = out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)
            x = x + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
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
        raise FileNotFoundError(f"model folder {path!r} does not exist; pass a local Hugging Face model folder, "
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
