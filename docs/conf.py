"""Sphinx configuration for the polystore documentation."""

from __future__ import annotations

import sys
from pathlib import Path

# Build against the checkout next to this file, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polystore._version import __version__

project = "polystore"
author = "polystore developers"
copyright = "2026, polystore developers"
version = release = __version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
# No intersphinx: the build must not need the network, and with -W a failed
# inventory download would fail it.

exclude_patterns = ["_build"]
root_doc = "index"

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_type_aliases = {"PathArg": "polystore.paths.PathArg"}
# The docs environment installs Sphinx only; polystore.testing imports pytest at
# module level, and nothing else documented here needs more than numpy.
autodoc_mock_imports = ["pytest"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"polystore {release}"
