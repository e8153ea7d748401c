"""Build script for the one thing pyproject.toml cannot say: the optional C extension.

``polystore._shm._fastpath`` speeds up the steady-state ``put`` and ``get`` of
:class:`polystore.SharedArrayStore`. It is optional: where no C compiler is
found, or with ``POLYSTORE_PURE_PYTHON=1`` in the environment, the install
succeeds without it and the store runs its pure-Python paths, which define
the semantics and pass the same tests.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def fast_path() -> list[Extension]:
    """The extension, or nothing when it is turned off or numpy's headers are missing."""
    if os.environ.get("POLYSTORE_PURE_PYTHON", "") not in ("", "0") or sys.platform == "win32":
        return []
    try:
        import numpy  # the build requirements bring it (pyproject.toml)
    except ImportError:
        print("polystore: numpy is not importable at build time; no C fast path")
        return []
    return [
        Extension(
            "polystore._shm._fastpath",
            sources=[
                "polystore/_shm/_fastpath.c",
                "polystore/_shm/_fastpath_read.c",
                "polystore/_shm/_fastpath_write.c",
                "polystore/_shm/_fastpath_keys.c",
                "polystore/_shm/_fastpath_lock.c",
            ],
            depends=["polystore/_shm/_fastpath.h"],
            include_dirs=[numpy.get_include()],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            optional=True,  # a failed compile leaves a working pure-Python install
        )
    ]


class BuildExt(build_ext):
    """build_ext that says once, plainly, when the optional fast path could not be built."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # any compiler failure: report, then let setuptools decide
            sys.stderr.write(
                "\n"
                "polystore: the optional C fast path could not be built "
                f"({type(exc).__name__}: {exc}).\n"
                "polystore: it works without it, more slowly for small values; "
                "`python -m polystore info` says which is in use.\n\n"
            )
            raise


ext_modules = fast_path()

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
