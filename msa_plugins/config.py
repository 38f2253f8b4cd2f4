"""MSAConfig: every knob of the engine in one place, with the paper's defaults where they apply."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

MODES = ("interleave", "sparse", "protocol")


@dataclass
class MSAConfig:
    chunk_size: int = 64  # P: tokens per pooled chunk (paper: 64)
    routing_layers: Optional[list] = None  # None: the router's layers, else the upper half of the model
    score: str = "cosine"  # routing score: "cosine" (paper, training) or "dot" (scaled dot product)
    keep_inputs: bool = False  # keep pooled layer inputs so the bank can be re-keyed for a new router
    k: int = 5  # documents per question (paper: 16)
    mode: str = "interleave"  # default answering mode (see MODES)
    rounds: int = 1  # interleave: routing rounds (re-route on question + injected text)
    max_rounds: int = 4  # cap on rounds (interleave) and on retrieval steps (protocol)
    max_new_tokens: int = 128
    temperature: float = 0.0
    system_prompt: Optional[str] = None  # None: the model's chat-template default (or the prompt style's)
    prompt_style: Optional[str] = None  # interleave prompt (engine.generation.PROMPT_STYLES); None: the default
    max_doc_tokens: Optional[int] = None  # None: the model's window; longer documents are split
    split_long_documents: bool = True
    batch_tokens: int = 4096  # encoding batch size in (padded) tokens
    content_tier: str = "device"  # where content K̄/V̄ lives: "device" (with the model) or "host" (CPU, pinned)
    int8_routing_keys: bool = False  # store routing keys as int8 + per-head scale: half the bytes to read
    routing_backend: str = "auto"  # "auto" (Triton on CUDA), "torch", "triton"
    protocol_end_marker: str = "[END]"  # trained-checkpoint protocol: end of retrieval
    protocol_delimiter: str = "\n"

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.score not in ("cosine", "dot"):
            raise ValueError(f"score must be 'cosine' or 'dot', got {self.score!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.content_tier not in ("device", "host"):
            raise ValueError(f"content_tier must be 'device' or 'host', got {self.content_tier!r}")
        if self.prompt_style is not None:
            from .engine.generation import PROMPT_STYLES

            if self.prompt_style not in PROMPT_STYLES:
                raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def to_dict(self) -> dict:
        return asdict(self)
