"""Shared test fixtures."""

from pathlib import Path

import pytest

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub.zip"


@pytest.fixture(scope="session")
def shared_zip() -> Path:
    """The Tiny ImageNet subset in ../shared, or a skip with the reason."""
    if not SHARED_ZIP.is_file():
        pytest.skip(
            f"Tiny ImageNet subset not found at {SHARED_ZIP} (only present beside the repo in CI/dev)"
        )
    return SHARED_ZIP
