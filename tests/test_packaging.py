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
