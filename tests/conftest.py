"""Shared test fixtures."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen import smooth_images

SHARED_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-200-sub.zip"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """tinyswin's caches (compiled augmentation kernels, the built-in dataset) in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINYSWIN_CACHE", str(tmp_path_factory.mktemp("tinyswin-cache")))
        yield


@pytest.fixture(scope="session")
def shared_zip() -> Path:
    """The Tiny ImageNet subset in ../shared, or a skip with the reason."""
    if not SHARED_ZIP.is_file():
        pytest.skip(
            f"Tiny ImageNet subset not found at {SHARED_ZIP} (only present beside the repo in CI/dev)"
        )
    return SHARED_ZIP


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (small batches run faster without OpenMP hand-offs); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def jpeg_images(shared_zip: Path) -> torch.Tensor:
    """24 decoded Tiny ImageNet JPEGs (N, 3, 64, 64) uint8, or a skip when the shared zip is absent."""
    with zipfile.ZipFile(shared_zip) as zf:
        names = sorted(n for n in zf.namelist() if "/train/" in n and n.endswith(".JPEG"))[::2000][:24]
        arrays = [np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(params=["smooth", "jpeg"])
def images(request) -> torch.Tensor:
    """uint8 (N, 3, H, W) test images: synthetic (always) and real JPEGs (when the shared zip exists)."""
    if request.param == "smooth":
        return smooth_images(24)
    return request.getfixturevalue("jpeg_images")
