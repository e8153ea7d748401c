"""The disk backend: the conformance suite plus what only a real file system shows."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from polystore.disk import DiskBackend
from polystore.testing import BackendTests


class TestDiskBackend(BackendTests):
    formats = (".npy", ".npz", ".json", ".txt", ".bin")

    @pytest.fixture
    def backend(self, tmp_path: Path) -> DiskBackend:
        return DiskBackend(root=tmp_path)
