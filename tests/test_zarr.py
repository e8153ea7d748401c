"""The zarr backend: the conformance suite plus what is specific to zarr."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from polystore.testing import BackendTests

pytest.importorskip("zarr", minversion="3")

from polystore.zarr_backend import ZarrBackend


class TestZarrBackend(BackendTests):
    formats = (".npy",)
    arrays_under_any_name = True

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ZarrBackend]:
        with ZarrBackend(tmp_path) as backend:
            yield backend
