"""Router projectors W_QR / W_KR: what turns a layer's states into routing queries and routing keys.

MSA section 6: per routing layer, bias-free linear maps reading the layer's normalised input (the same
input as q_proj/k_proj), no norm, no RoPE. W_QR: hidden -> H x D, W_KR: hidden -> H_kv x D.

Two kinds live behind one interface:
- `Router`: trained projectors, loaded from a router adapter folder or an MSA-4B-format checkpoint.
- `QKRouter`: the training-free baseline: the layer's own q_proj/k_proj (with Qwen3's q_norm/k_norm),
  before RoPE. Measured at chance level on real banks: a baseline, not the default quality.

Both map a normalised layer input h [..., hidden] to [..., heads, D]. Because W_KR is linear,
mean_pool(h) @ W_KR^T == mean_pool(h @ W_KR^T): a bank that keeps its pooled layer inputs can be
re-keyed for a new router with one matrix product per layer, no model forward.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from typing import Optional

import torch

from .._io import fsync_dir, fsync_file
from ..errors import PathNotFoundError, InvalidArgumentError, MemoryFormatError, RouterMismatchError

try:
    import fcntl
except ImportError:  # Windows: saves into one folder are not serialised across processes
    fcntl = None

logger = logging.getLogger(__name__)

ROUTER_FORMAT_VERSION = 1
MSA4B_Q = "model.layers.{layer}.self_attn.router_q_proj.0.weight"
MSA4B_K = "model.layers.{layer}.self_attn.router_k_proj.0.weight"
_MSA4B_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.router_([qk])_proj\.0\.weight$")
WEIGHTS, MANIFEST = "router.safetensors", "router.json"  # a router adapter folder
_TMP_WEIGHTS, _TMP_MANIFEST = ".router.safetensors.tmp", ".router.json.tmp"  # a save's new files, before renaming
_LOCK = ".router.lock"
ADAPTER_FILES = (WEIGHTS, MANIFEST, _TMP_WEIGHTS, _TMP_MANIFEST, _LOCK)  # every file Router.save may leave


@contextlib.contextmanager
def _save_lock(directory: str):
    """Saves into one folder take turns: an OS lock on `.router.lock` (per open file, so threads too)."""
    fd = os.open(os.path.join(directory, _LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_manifest(path: str) -> Optional[dict]:
    """A router.json-shaped file as a dict, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


class QKRouter:
    """Training-free routing with the layer's own query/key projections, before RoPE."""

    kind = "qk"

    def __init__(self, model, layers):
        self.model = model
        self.layers = list(layers)

    def fingerprint(self) -> str:
        return "qk"

    def query(self, layer: int, h_norm: torch.Tensor, q_pre_rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h_norm [T, hidden] -> [T, H, D]. `q_pre_rope` [H, T, D], when the forward already computed it."""
        if q_pre_rope is None:
            q_pre_rope, _, _ = self.model.project_qkv(layer, h_norm[None])
            q_pre_rope = q_pre_rope[0]
        return q_pre_rope.transpose(0, 1)

    def key(self, layer: int, h_norm: torch.Tensor) -> torch.Tensor:
        """h_norm [N, hidden] -> [N, G, D]. Not linear for Qwen3 (k_norm), so it cannot re-key from pooled inputs."""
        _, k, _ = self.model.project_qkv(layer, h_norm[None])
        return k[0].transpose(0, 1)


class Router:
    """Trained router projectors, one (W_QR, W_KR) pair per routing layer."""

    kind = "router"

    def __init__(self, wq: dict, wk: dict, n_heads: int, n_kv_heads: int, head_dim: int,
                 meta: Optional[dict] = None):
        if sorted(wq) != sorted(wk):
            raise RouterMismatchError(f"router has W_QR for layers {sorted(wq)} but W_KR for layers {sorted(wk)}; "
                                      "every routing layer needs both projectors")
        self.layers = sorted(int(l) for l in wq)
        self.wq = {int(l): w for l, w in wq.items()}  # [H*D, hidden]
        self.wk = {int(l): w for l, w in wk.items()}  # [G*D, hidden]
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.meta = dict(meta or {})
        for l in self.layers:
            if self.wq[l].shape[0] != n_heads * head_dim or self.wk[l].shape[0] != n_kv_heads * head_dim:
                raise RouterMismatchError(f"router layer {l}: W_QR {tuple(self.wq[l].shape)} / W_KR {tuple(self.wk[l].shape)} "
                                 f"do not match {n_heads} heads, {n_kv_heads} KV heads x {head_dim} dims")
        self._fingerprint = None

    def check_finite(self, where: str = "router") -> None:
        """Raise `InvalidArgumentError` naming the first layer whose projectors hold NaN or inf: such a
        router scores every document NaN and silently routes nothing."""
        for l in self.layers:
            for name, w in (("W_QR", self.wq[l]), ("W_KR", self.wk[l])):
                if not bool(torch.isfinite(w).all()):
                    raise InvalidArgumentError(f"{where}: {name} of routing layer {l} holds NaN or inf values; "
                                               "this router cannot route (retrain it, e.g. with a lower learning rate)")

    @property
    def hidden_size(self) -> int:
        return self.wq[self.layers[0]].shape[1]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.sha256()
            for l in self.layers:
                for w in (self.wq[l], self.wk[l]):
                    h.update(str(l).encode())
                    h.update(w.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
            self._fingerprint = "router:" + h.hexdigest()[:16]
        return self._fingerprint

    def to(self, device=None, dtype=None) -> "Router":
        self.wq = {l: w.to(device=device, dtype=dtype) for l, w in self.wq.items()}
        self.wk = {l: w.to(device=device, dtype=dtype) for l, w in self.wk.items()}
        return self

    def query(self, layer: int, h_norm: torch.Tensor, q_pre_rope=None) -> torch.Tensor:
        w = self.wq[layer]
        return (h_norm.to(w.dtype) @ w.T).view(*h_norm.shape[:-1], self.n_heads, self.head_dim)

    def key(self, layer: int, h_norm: torch.Tensor) -> torch.Tensor:
        w = self.wk[layer]
        return (h_norm.to(w.dtype) @ w.T).view(*h_norm.shape[:-1], self.n_kv_heads, self.head_dim)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str) -> None:
        """A router adapter: `router.safetensors` (MSA-4B weight names) + `router.json`.

        The two files are replaced one after the other, so the new manifest is written in full first
        (`.router.json.tmp`, the journal): a save cut off between the two renames leaves the new weights beside
        that journal, and `load` finishes the save from it. A save cut off earlier leaves the old adapter as it
        was. Saves into one folder take turns (an OS file lock), so two of them never mix their files."""
        from safetensors.torch import save_file

        self.check_finite(f"router not saved to {directory!r}")
        os.makedirs(directory, exist_ok=True)
        manifest = {"format_version": ROUTER_FORMAT_VERSION, "layers": self.layers, "n_heads": self.n_heads,
                    "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "hidden_size": self.hidden_size,
                    "fingerprint": self.fingerprint(), "meta": self.meta}
        with _save_lock(directory):
            tmp_w, tmp_json = os.path.join(directory, _TMP_WEIGHTS), os.path.join(directory, _TMP_MANIFEST)
            save_file({k: v.contiguous().cpu() for k, v in self.to_msa4b_state_dict().items()}, tmp_w)
            fsync_file(tmp_w)
            with open(tmp_json, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(directory)  # both complete on disk before the first rename: the journal survives a crash
            os.replace(tmp_w, os.path.join(directory, WEIGHTS))
            os.replace(tmp_json, os.path.join(directory, MANIFEST))
            fsync_dir(directory)

    @classmethod
    def load(cls, directory: str) -> "Router":
        """Read a router adapter folder. A folder that is not one, is damaged, is from another format
        version or holds NaN/inf weights raises `MemoryFormatError` naming it; nothing is unpickled."""
        path_json, path_w = os.path.join(directory, MANIFEST), os.path.join(directory, WEIGHTS)
        if not os.path.exists(directory):
            raise PathNotFoundError(f"router folder {directory!r} does not exist; pass a folder written by "
                                    "`msa train-router`, or router='none' for the training-free baseline")
        if not (os.path.isfile(path_json) and os.path.isfile(path_w)):
            raise MemoryFormatError(f"{directory!r} is not a router adapter: it needs router.json and "
                                    "router.safetensors (written by `msa train-router` or Router.save)")
        try:
            with open(path_json, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MemoryFormatError(f"router adapter {path_json!r} cannot be read ({e}); write the adapter again") from e
        for _ in range(3):
            router, saved = cls._read(directory, m, path_w)
            if saved is None or saved == router.fingerprint():
                return router
            # the weights are not the ones this manifest names: a save was cut off between its two renames
            # (its journal names the new weights), or one finished between our two reads (read again)
            journal = _read_manifest(os.path.join(directory, _TMP_MANIFEST))
            if journal is not None and journal.get("fingerprint") == router.fingerprint():
                logger.warning("router adapter %r: finishing a save that was cut off (its new manifest was "
                               "written, not yet renamed)", directory)
                return cls._read(directory, journal, path_w, weights=router)[0]
            m = _read_manifest(path_json) or m
        raise MemoryFormatError(f"router adapter {directory!r}: router.safetensors ({router.fingerprint()}) is not "
                                f"the router router.json was written for ({saved}); a save was interrupted or "
                                "the files were mixed: write the adapter again")

    @classmethod
    def _read(cls, directory: str, m: dict, path_w: str, weights: Optional["Router"] = None) -> tuple:
        """The router of manifest `m` and the weights file -> (router, the fingerprint `m` names)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not isinstance(m, dict) or m.get("format_version") != ROUTER_FORMAT_VERSION:
            version = m.get("format_version") if isinstance(m, dict) else None
            raise MemoryFormatError(f"router adapter {directory!r} has format version {version!r}, this "
                                    f"msa-plugins reads version {ROUTER_FORMAT_VERSION}; retrain or re-export it")
        shape = {}
        for key in ("n_heads", "n_kv_heads", "head_dim"):
            value = m.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MemoryFormatError(f"router adapter {directory!r}: {key} is {value!r}, expected a positive int")
            shape[key] = value
        meta = m.get("meta")
        meta = meta if isinstance(meta, dict) else None
        if weights is not None:  # the weights already read, under the manifest that names them
            state = weights.to_msa4b_state_dict()
        else:
            try:
                state = load_file(path_w)
            except (SafetensorError, OSError, ValueError) as e:
                raise MemoryFormatError(f"router adapter {path_w!r} is damaged ({e}); write the adapter again") from e
        try:
            router = cls.from_msa4b_state_dict(state, meta=meta, **shape)
            router.check_finite(f"router adapter {directory!r}")
        except (RouterMismatchError, InvalidArgumentError) as e:
            raise MemoryFormatError(str(e)) from e
        return router, m.get("fingerprint")

    def to_msa4b_state_dict(self) -> dict:
        sd = {}
        for l in self.layers:
            sd[MSA4B_Q.format(layer=l)] = self.wq[l]
            sd[MSA4B_K.format(layer=l)] = self.wk[l]
        return sd

    @classmethod
    def from_msa4b_state_dict(cls, state_dict: dict, n_heads: int, n_kv_heads: int, head_dim: int,
                              meta: Optional[dict] = None) -> "Router":
        wq, wk = {}, {}
        for name, w in state_dict.items():
            m = _MSA4B_RE.match(name)
            if m:
                (wq if m.group(2) == "q" else wk)[int(m.group(1))] = w.detach().float()
        if not wq:
            raise RouterMismatchError("no router projectors found (expected names like "
                                      f"{MSA4B_Q.format(layer=18)!r})")
        return cls(wq, wk, n_heads, n_kv_heads, head_dim, meta=meta)


def read_msa4b_router(model_dir: str, n_heads: int, n_kv_heads: int, head_dim: int) -> Optional[Router]:
    """The router projectors of an MSA-4B-format checkpoint folder, or None if it carries none."""
    from safetensors import safe_open

    files = [f for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors")]
    found = {}
    for f in files:
        with safe_open(os.path.join(model_dir, f), framework="pt") as st:
            for name in st.keys():
                if _MSA4B_RE.match(name):
                    found[name] = st.get_tensor(name)
    if not found:
        return None
    router = Router.from_msa4b_state_dict(found, n_heads, n_kv_heads, head_dim, meta={"source": model_dir})
    try:
        router.check_finite(f"the router projectors of {model_dir!r}")
    except InvalidArgumentError as e:
        raise MemoryFormatError(str(e)) from e
    return router
