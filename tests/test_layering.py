"""The package's layers, enforced: data flows one way, CLI / integrations / evaluation / benchmarks ->
the public facade (`msa_plugins`, `MSAEngine`) -> engine -> kernels, and nothing above the facade touches
engine internals. An `ast` walk over every source file resolves each import to a module name and checks
it against the rules of the importing file's layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# top-level folders mapped into the package by pyproject.toml
FOLDER_TO_PACKAGE = {"msa_plugins": "msa_plugins", "engine": "msa_plugins.engine", "kernels": "msa_plugins.kernels",
                     "integrations": "msa_plugins.integrations"}
# leaf modules every layer may use (they import nothing above themselves)
LEAVES = ("msa_plugins.errors", "msa_plugins.types", "msa_plugins.config", "msa_plugins.validation",
          "msa_plugins._io", "msa_plugins.metrics")
# the facade: the only modules that compose the engine's parts
FACADE = ("msa_plugins.core", "msa_plugins.trainer", "msa_plugins.models", "msa_plugins")
# what code above the facade may import from the package
PUBLIC = ("msa_plugins",) + LEAVES + ("msa_plugins.integrations",)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in FOLDER_TO_PACKAGE:
        parts = FOLDER_TO_PACKAGE[parts[0]].split(".") + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(module: str, source: str, is_package: bool = False) -> list:
    """Absolute names of everything `source` (the text of `module`) imports, `from x import y` giving
    both x and x.y (y may be a sub-module)."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out.extend(f"{name}.{a.name}" for a in node.names if a.name != "*")
    return out


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(module: str, path: Path) -> str:
    top = path.relative_to(ROOT).parts[0]
    if top in ("benchmarks", "examples"):
        return top
    if module.startswith("msa_plugins.kernels"):
        return "kernels"
    if module == "msa_plugins.engine.model":
        return "model"
    if module.startswith("msa_plugins.engine"):
        return "engine"
    if module.startswith("msa_plugins.integrations"):
        return "integrations"
    if module in ("msa_plugins.cli", "msa_plugins.eval_cli", "msa_plugins.train_cli"):
        return "cli"
    if module in LEAVES:
        return "leaf"
    return "facade"


def violations(module: str, source: str, layer: str, is_package: bool = False) -> list:
    """Forbidden imports of one file, as readable strings."""
    bad = []
    for name in imported_modules(module, source, is_package):
        if not name.startswith("msa_plugins"):
            continue
        if layer == "kernels":
            ok = _within(name, ("msa_plugins.kernels",))
        elif layer == "model":
            ok = _within(name, ("msa_plugins.kernels", "msa_plugins.errors", "msa_plugins.config",
                                "msa_plugins.validation", "msa_plugins._io", "msa_plugins.engine.model"))
        elif layer == "leaf":
            ok = _within(name, LEAVES) and name != "msa_plugins"
        elif layer == "engine":
            ok = _within(name, ("msa_plugins.kernels", "msa_plugins.engine") + LEAVES)
        elif layer == "facade":
            ok = True
        else:  # integrations, cli, benchmarks, examples: public names only
            allowed = PUBLIC + (("msa_plugins.kernels",) if layer == "benchmarks" else ()) + \
                (("msa_plugins.trainer", "msa_plugins.server", "msa_plugins.scheduler")
                 if layer in ("cli", "benchmarks") else ())
            ok = _within(name, allowed) and not _within(name, ("msa_plugins.engine", "msa_plugins.core"))
        if not ok:
            bad.append(f"{module} ({layer}) imports {name}")
    # internals reached through an engine object: the bank, its snapshots' tensors, generation stats
    if layer in ("integrations", "cli", "benchmarks", "examples"):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in ("_bank", "_state", "encoder"):
                bad.append(f"{module} ({layer}) reads .{node.attr}")
            if isinstance(node, ast.Name) and node.id == "GenerationStats":
                bad.append(f"{module} ({layer}) uses GenerationStats")
    return bad


def source_files():
    for top in ("msa_plugins", "engine", "kernels", "integrations", "benchmarks", "examples"):
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path


def test_every_layer_imports_only_what_it_may():
    bad = []
    for path in source_files():
        module = module_name(path)
        bad += violations(module, path.read_text(encoding="utf-8"), layer_of(module, path),
                          is_package=path.name == "__init__.py")
    assert not bad, "layering violations:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,layer,source", [
    ("msa_plugins.kernels.routing", "kernels", "from ..engine.bank import BankState\n"),
    ("msa_plugins.kernels.routing", "kernels", "import msa_plugins.core\n"),
    ("msa_plugins.engine.model", "model", "from .bank import MemoryBank\n"),
    ("msa_plugins.engine.bank", "engine", "from ..core import MSAEngine\n"),
    ("msa_plugins.integrations.langchain.chat_models", "integrations", "from ...engine.generation import GenerationStats\n"),
    ("msa_plugins.integrations.llama_index.retrievers", "integrations", "from msa_plugins.core import MSAEngine\n"),
    ("msa_plugins.cli", "cli", "from .engine.memory import BankState\n"),
    ("benchmarks.encode_route", "benchmarks", "from msa_plugins.engine.encoding import Encoder\n"),
    ("msa_plugins.integrations.langchain.vectorstores", "integrations", "def f(engine):\n    return engine._bank.state\n"),
    ("msa_plugins.errors", "leaf", "from .core import MSAEngine\n"),
], ids=lambda v: v if "\n" not in v else v.split()[1])
def test_a_forbidden_import_is_caught(module, layer, source):
    assert violations(module, source, layer)


@pytest.mark.parametrize("module,layer,source", [
    ("msa_plugins.kernels.routing", "kernels", "from .naive import doc_scores_naive\n"),
    ("msa_plugins.engine.bank", "engine", "from ..kernels.routing import quantize_keys_int8\nfrom ..errors import MSAError\n"),
    ("msa_plugins.integrations.langchain.chat_models", "integrations", "from msa_plugins import MSAEngine\nfrom .._aio import aiter_in_thread\n"),
    ("benchmarks.routing_scale", "benchmarks", "from msa_plugins.kernels import doc_scores\n"),
], ids=["kernels-own", "engine-down", "adapter-public", "bench-kernels"])
def test_allowed_imports_pass(module, layer, source):
    assert violations(module, source, layer) == []
