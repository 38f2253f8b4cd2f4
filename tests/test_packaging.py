"""What an installed msa-plugins promises about its environment (the wheel itself: tests/test_wheel.py)."""

import os
import subprocess
import sys


def test_plain_import_ragas_works_with_the_eval_extra():
    """The `eval` extra pins langchain-community so that ragas imports as its users write it, with no
    placeholder module of ours registered first."""
    env = {**os.environ, "RAGAS_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-c", "import sys, ragas; "
                          "assert 'msa_plugins' not in sys.modules; print(ragas.__version__)"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_package_is_typed_and_its_folders_map_into_one_import_package():
    import msa_plugins
    from msa_plugins import engine, integrations, kernels

    root = os.path.dirname(msa_plugins.__file__)
    assert os.path.isfile(os.path.join(root, "py.typed"))
    for sub in (engine, kernels, integrations):
        assert sub.__name__.startswith("msa_plugins.")


def test_the_checkouts_kernels_folder_does_not_shadow_the_pypi_kernels_package():
    """Run from a checkout's root (`python -m ...`), sys.path starts with it and `kernels/` (msa_plugins.kernels)
    stands where a top-level `kernels` is looked for; transformers >= 5.25 depends on the PyPI package of that name
    and imports it. When that package is installed, `import kernels` gets it; transformers loads either way."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import importlib.metadata as md, sys\n"
            "try:\n    md.version('kernels'); installed = True\n"
            "except md.PackageNotFoundError:\n    installed = False\n"
            "import transformers.modeling_utils\n"
            "import kernels\n"
            "assert installed == (not kernels.__file__.startswith(sys.argv[1])), (installed, kernels.__file__)\n"
            "import msa_plugins.kernels as ours\n"
            "assert ours.__file__.startswith(sys.argv[1]) and callable(ours.doc_scores)\n"
            "print('pypi' if installed else 'ours')\n")
    ours = os.path.join(root, "kernels", "")  # the folder, not the root: a .venv may live in the checkout
    out = subprocess.run([sys.executable, "-c", code, ours], cwd=root, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in ("pypi", "ours")
