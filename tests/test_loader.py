"""BatchLoader: seeded epoch orders, disjoint equal shards, eval tails, batch contents, devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinyswin.data.cache import load_cache, write_cache
from tinyswin.data.loader import BatchLoader


def _data(n: int, size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels encode their index (row i is filled with i % 256 and i // 256), labels i % 7."""
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    images[..., 0] = (np.arange(n) % 256)[:, None, None]
    images[..., 1] = (np.arange(n) // 256)[:, None, None]
    return images, (np.arange(n) % 7).astype(np.int64)


def _index_of(batch: torch.Tensor) -> list[int]:
    return (batch[:, 0, 0, 0].long() + 256 * batch[:, 0, 0, 1].long()).tolist()


def _epoch(loader: BatchLoader) -> list[list[int]]:
    return [_index_of(images) for images, _ in loader]


@pytest.mark.parametrize("n", [96, 103])
def test_training_shards_are_disjoint_equal_and_cover_the_epoch(n):
    images, labels = _data(n)
    world = 4
    loaders = [BatchLoader(images, labels, 8, rank=r, world_size=world, seed=3) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(5)
    shards = [[i for batch in _epoch(loader) for i in batch] for loader in loaders]
    per_rank = n // world // 8 * 8
    assert [len(s) for s in shards] == [per_rank] * world
    assert [len(loader) for loader in loaders] == [n // world // 8] * world
    union = set().union(*map(set, shards))
    assert len(union) == per_rank * world  # disjoint
    assert union <= set(range(n))
    if n % (world * 8) == 0:
        assert union == set(range(n))


def test_same_seed_and_epoch_same_order_other_epochs_and_seeds_differ():
    images, labels = _data(200)
    a = BatchLoader(images, labels, 10, seed=1)
    b = BatchLoader(images.copy(), labels.copy(), 10, seed=1)
    c = BatchLoader(images, labels, 10, seed=2)
    a.set_epoch(3)
    b.set_epoch(3)
    c.set_epoch(3)
    first = _epoch(a)
    assert first == _epoch(b)
    assert first == _epoch(a)  # the order does not advance by itself
    assert first != _epoch(c)
    b.set_epoch(4)
    assert first != _epoch(b)
    assert sorted(i for batch in first for i in batch) == list(range(200))
    assert [i for batch in first for i in batch] != list(range(200))
    swapped = BatchLoader(images, labels, 10, seed=3)
    swapped.set_epoch(1)
    a.set_epoch(3)
    assert _epoch(swapped) != _epoch(a)  # (seed, epoch) is not summed into one number


def test_eval_sees_every_sample_exactly_once_including_the_tail():
    images, labels = _data(103)
    world = 4
    loaders = [
        BatchLoader(images, labels, 10, shuffle=False, drop_last=False, rank=r, world_size=world)
        for r in range(world)
    ]
    seen = [[i for batch in _epoch(loader) for i in batch] for loader in loaders]
    assert [len(s) for s in seen] == [26, 26, 26, 25]
    assert [len(loader) for loader in loaders] == [3, 3, 3, 3]
    assert sorted(i for s in seen for i in s) == list(range(103))
    assert seen[1] == list(range(1, 103, 4))
    single = BatchLoader(images, labels, 10, shuffle=False, drop_last=False)
    sizes = [len(batch) for batch in _epoch(single)]
    assert sizes == [10] * 10 + [3] and len(single) == 11


def test_batches_hold_the_right_images_and_labels():
    images, labels = _data(50, size=6)
    loader = BatchLoader(images, labels, 16, seed=9, drop_last=False)
    expected = loader.indices().tolist()
    got = []
    for batch_images, batch_labels in loader:
        assert batch_images.dtype == torch.uint8 and batch_labels.dtype == torch.int64
        assert batch_images.shape[1:] == (6, 6, 3)
        index = _index_of(batch_images)
        np.testing.assert_array_equal(batch_images.numpy(), images[index])
        assert batch_labels.tolist() == labels[index].tolist()
        got += index
    assert got == expected


def test_reads_a_cache_memmap(tmp_path):
    images, labels = _data(40)
    out = write_cache(
        tmp_path / "c", {"train": (images, labels)}, [str(i) for i in range(7)], list("abcdefg"), "t"
    )
    cache_images, cache_labels = load_cache(out).split("train")
    assert isinstance(cache_images, np.memmap)
    loader = BatchLoader(cache_images, cache_labels, 8, shuffle=False, drop_last=False)
    batches = list(loader)
    assert torch.equal(torch.cat([b for b, _ in batches]), torch.from_numpy(images))
    assert torch.equal(torch.cat([lab for _, lab in batches]), torch.from_numpy(labels))


def test_bad_arguments_are_refused():
    images, labels = _data(10)
    with pytest.raises(ValueError, match="rank 2"):
        BatchLoader(images, labels, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(images.astype(np.float32), labels, 2)
    with pytest.raises(ValueError, match="labels shape"):
        BatchLoader(images, labels[:5], 2)
    with pytest.raises(ValueError, match="do not fill one batch"):
        BatchLoader(images, labels, 8, world_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu():
    images, labels = _data(64)
    cpu = BatchLoader(images, labels, 16, seed=4)
    gpu = BatchLoader(images, labels, 16, seed=4, device="cuda")
    assert gpu.resident and gpu.images.is_cuda
    for (ci, cl), (gi, gl) in zip(cpu, gpu, strict=True):
        assert gi.is_cuda and gl.is_cuda
        assert torch.equal(ci, gi.cpu()) and torch.equal(cl, gl.cpu())
