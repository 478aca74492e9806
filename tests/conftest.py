"""Shared fixtures. Test data (Coral's public models and images) is read from
``SEGD_TEST_DATA`` (default ``<repo>/../shared/coral-test-data``) and never copied into the repo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_data_dir() -> Path:
    return Path(os.environ.get("SEGD_TEST_DATA", REPO.parent / "shared" / "coral-test-data"))


@pytest.fixture(scope="session")
def test_data() -> Path:
    path = test_data_dir()
    if not (path / "deeplabv3_mnv2_pascal_quant.tflite").is_file():
        pytest.fail(f"Coral test data not found in {path}; set SEGD_TEST_DATA")
    return path
