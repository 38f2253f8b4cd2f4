"""The public surface, pinned (as langchain partner packages pin theirs): a change here is an API change."""

import msa_plugins
from msa_plugins import errors

EXPECTED_ALL = [
    "MSAEngine", "MSAConfig", "AnswerOptions", "DEFAULT_COLLECTION", "ALL_COLLECTIONS",
    "Snapshot", "MemoryDocument", "RoutedDocument", "Routing", "Stream", "QueryResult", "GenerationResult",
    "MSAError", "InvalidArgumentError", "InvalidTypeError", "InputTooLongError", "UnsupportedModelError",
    "MemoryFormatError", "ModelMismatchError", "RouterMismatchError", "EmptyMemoryError", "DocumentNotFoundError",
    "DuplicateIdError", "MemoryLockedError", "CallTimeoutError", "PathNotFoundError", "ToolCallError",
    "DatasetNotFoundError", "__version__",
]


def test_all_is_pinned():
    assert sorted(msa_plugins.__all__) == sorted(EXPECTED_ALL)
    for name in msa_plugins.__all__:
        assert hasattr(msa_plugins, name), name


def test_every_error_is_an_msa_error_and_keeps_its_builtin_base():
    builtin = {"InvalidArgumentError": ValueError, "InvalidTypeError": TypeError, "InputTooLongError": ValueError,
               "UnsupportedModelError": ValueError, "MemoryFormatError": ValueError, "ModelMismatchError": ValueError,
               "RouterMismatchError": ValueError, "EmptyMemoryError": LookupError, "DocumentNotFoundError": KeyError,
               "DuplicateIdError": ValueError, "MemoryLockedError": TimeoutError,
               "CallTimeoutError": TimeoutError,
               "PathNotFoundError": FileNotFoundError, "ToolCallError": ValueError, "DatasetNotFoundError": FileNotFoundError}
    assert sorted(builtin) == sorted(n for n in errors.__all__ if n != "MSAError")
    for name, base in builtin.items():
        cls = getattr(msa_plugins, name)
        assert issubclass(cls, msa_plugins.MSAError) and issubclass(cls, base), name
    # a KeyError subclass that prints its message, not its repr
    assert str(msa_plugins.DocumentNotFoundError("unknown id 'x'")) == "unknown id 'x'"


def test_version_comes_from_package_metadata():
    from importlib.metadata import version

    assert msa_plugins.__version__ == version("msa-plugins")


def test_config_is_frozen_and_overrides_make_copies():
    import dataclasses

    import pytest

    from msa_plugins import AnswerOptions, MSAConfig

    base = MSAConfig()
    changed = base.with_overrides(chunk_size=32, k=8, system_prompt="Be brief.")
    assert (base.chunk_size, base.answer.k, base.answer.system) == (64, 5, None)
    assert (changed.chunk_size, changed.answer.k, changed.answer.system) == (32, 8, "Be brief.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.chunk_size = 8
    with pytest.raises(TypeError, match="unknown setting 'chunk'"):
        base.with_overrides(chunk=3)
    opts = AnswerOptions(k=3)
    assert opts.merged(k=None, max_new_tokens=7) == AnswerOptions(k=3, max_new_tokens=7)
    assert AnswerOptions(stop="###").stop == ("###",)
