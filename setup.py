"""Build script for the one thing pyproject.toml cannot say: the optional C extension.

``polystore._fastpath`` speeds up the steady-state ``put`` and ``get`` of
:class:`polystore.SharedArrayStore`. It is optional: where no C compiler is
found, or with ``POLYSTORE_PURE_PYTHON=1`` in the environment, the install
succeeds without it and the store runs its pure-Python paths, which define
the semantics and pass the same tests.
"""

import os
import sys

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("POLYSTORE_PURE_PYTHON", "") in ("", "0") and sys.platform != "win32":
    ext_modules.append(
        Extension(
            "polystore._fastpath",
            sources=["polystore/_fastpath.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
