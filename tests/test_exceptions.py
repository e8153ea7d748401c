"""Every polystore exception survives pickling and is caught by its builtin twin."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import polystore.exceptions as exc_module
from polystore.testing import EXCEPTION_SAMPLES


@pytest.mark.parametrize("error", EXCEPTION_SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(error: BaseException) -> None:
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert clone.args == error.args
    assert vars(clone) == vars(error)


def test_every_class_is_sampled() -> None:
    defined = {
        obj
        for obj in vars(exc_module).values()
        if isinstance(obj, type) and issubclass(obj, exc_module.StorageError)
    }
    assert defined == {type(e) for e in EXCEPTION_SAMPLES}


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (exc_module.BackendNotFoundError("x"), KeyError),
        (exc_module.UnsupportedFormatError("a.x"), ValueError),
        (exc_module.CorruptFileError("a.npy", "empty"), ValueError),
        (exc_module.CorruptFileError("a.npy", "empty"), exc_module.UnsupportedFormatError),
        (exc_module.MetadataNotFoundError("a"), FileNotFoundError),
        (exc_module.SandboxError("a", "/r"), PermissionError),
        (exc_module.LockTimeoutError("a", 1), TimeoutError),
        (exc_module.NotShareableError("a"), TypeError),
        (exc_module.ShmFullError(1, 0, "x"), MemoryError),
        (exc_module.StoreNotFoundError("x"), FileNotFoundError),
        (exc_module.MissingDependencyError("x"), ImportError),
    ],
)
def test_builtin_bases(error: BaseException, builtin: type[BaseException]) -> None:
    assert isinstance(error, builtin)
    assert isinstance(error, exc_module.StorageError)


def test_messages_name_the_value_and_choices() -> None:
    text = str(exc_module.BackendNotFoundError("dsik", ["disk", "memory"]))
    assert "'dsik'" in text and "'disk'" in text and "'memory'" in text
    text = str(exc_module.UnsupportedFormatError("a.xyz", [".npy", ".json"], "unknown"))
    assert "a.xyz" in text and ".npy" in text
    err = exc_module.MetadataNotFoundError("p/q.npy")
    assert err.filename == "p/q.npy"


def test_corrupt_file_names_the_file_and_the_damage() -> None:
    err = exc_module.CorruptFileError("p/q.npy", "the file is empty")
    assert "p/q.npy" in str(err) and "the file is empty" in str(err)
    assert err.path == "p/q.npy" and err.reason == "the file is empty"


def test_what_the_readme_says_about_errors(tmp_path: Path) -> None:
    # File-system errors are the plain builtins, with errno and path; the errors
    # polystore adds are StorageErrors that also inherit a builtin.
    import errno

    from polystore import DiskBackend, MemoryBackend

    for backend in (DiskBackend(tmp_path), MemoryBackend()):
        backend.save(np.ones(1), "a.npy")
        cases = [
            (lambda b=backend: b.load("missing.npy"), FileNotFoundError, errno.ENOENT),
            (
                lambda b=backend: b.save(np.ones(1), "a.npy", overwrite=False),
                FileExistsError,
                errno.EEXIST,
            ),
        ]
        for action, builtin, code in cases:
            with pytest.raises(builtin) as info:
                action()
            assert type(info.value) is builtin and info.value.errno == code
            assert info.value.filename in ("missing.npy", "a.npy")
            assert not isinstance(info.value, exc_module.StorageError)
    for cls in vars(exc_module).values():
        if isinstance(cls, type) and issubclass(cls, exc_module.StorageError):
            builtins_ = [b for b in cls.__mro__ if b.__module__ == "builtins"]
            assert cls is exc_module.StorageError or builtins_[0] is not Exception, cls
