"""data.repeats: repeated augmentation, k differently augmented copies of each image in a training batch."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import _assert_same_run, make_tiny_cache, tiny_overrides
from tinyswin.checkpoint import load_checkpoint
from tinyswin.config import config_preset_names, load_config
from tinyswin.data import AugmentConfig, BatchLoader, build_augment
from tinyswin.errors import ConfigError
from tinyswin.train import DistContext, setup_run, train

pytestmark = pytest.mark.usefixtures("one_thread")

N, B, K = 100, 12, 3


def _data(n: int = N, size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """n distinct random uint8 images (N, size, size, 3) and labels i % 5."""
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    assert len({img.tobytes() for img in images}) == n
    return images, (np.arange(n) % 5).astype(np.int64)


def _pixels(images: torch.Tensor) -> list[bytes]:
    """Each uint8 image of a batch as its bytes."""
    return [img.numpy().tobytes() for img in images]


def _epoch(loader: BatchLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_every_batch_holds_each_of_its_images_exactly_k_times() -> None:
    images, labels = _data()
    loader = BatchLoader(images, labels, B, seed=1, repeats=K)
    by_pixels = {img.tobytes(): int(label) for img, label in zip(images, labels, strict=True)}
    for batch, batch_labels in _epoch(loader, 0):
        assert batch.dtype == torch.uint8 and batch.shape == (B, 8, 8, 3)
        counts = Counter(_pixels(batch))
        assert sorted(counts.values()) == [K] * (B // K)
        for pixels, label in zip(_pixels(batch), batch_labels.tolist(), strict=True):
            assert by_pixels[pixels] == label  # each copy keeps its own label


def test_an_epoch_keeps_its_steps_and_sees_about_n_over_k_images() -> None:
    images, labels = _data()
    plain = BatchLoader(images, labels, B, seed=1)
    repeated = BatchLoader(images, labels, B, seed=1, repeats=K)
    assert len(repeated) == len(plain) == N // B
    assert repeated.num_samples == plain.num_samples == N // B * B
    seen = [p for batch, _ in _epoch(repeated, 4) for p in dict.fromkeys(_pixels(batch))]  # in order
    assert len(seen) == len(set(seen)) == N // B * B // K == repeated.num_distinct  # 32 of 100, none twice
    # the first N/k images of the same seeded permutation that the plain loader follows
    first = [p for batch, _ in _epoch(plain, 4) for p in _pixels(batch)][: len(seen)]
    assert seen == first
    # another epoch: another draw of about N/k images
    other = {p for batch, _ in _epoch(repeated, 5) for p in _pixels(batch)}
    assert len(other) == len(seen) and other != set(seen)


def test_the_copies_are_augmented_differently() -> None:
    images, labels = _data(size=16)
    loader = BatchLoader(images, labels, B, seed=1, repeats=K)
    augment = build_augment(
        AugmentConfig(crop="rrc", crop_scale=(0.3, 1.0), hflip=0.5), (0.5,) * 3, (0.25,) * 3, 5, native=False
    )
    generator = torch.Generator().manual_seed(0)
    for batch, batch_labels in _epoch(loader, 0)[:3]:
        x, _ = augment(batch, batch_labels, generator=generator, mix=False)  # (B, 3, 16, 16)
        for group in range(0, B, K):  # the K copies of one image sit side by side
            assert len(set(_pixels(batch[group : group + K]))) == 1
            copies = x[group : group + K]
            for i in range(K):
                for j in range(i + 1, K):
                    assert not torch.equal(copies[i], copies[j]), (group, i, j)


def test_two_loaders_with_one_seed_give_the_same_batches() -> None:
    images, labels = _data()
    a = BatchLoader(images, labels, B, seed=7, repeats=K)
    b = BatchLoader(images, labels, B, seed=7, repeats=K)
    for epoch in (0, 3):
        for (xa, ya), (xb, yb) in zip(_epoch(a, epoch), _epoch(b, epoch), strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_seed = BatchLoader(images, labels, B, seed=8, repeats=K)
    assert not torch.equal(_epoch(other_seed, 0)[0][0], _epoch(a, 0)[0][0])


def test_ranks_take_disjoint_shards_each_repeated_within_its_batches() -> None:
    images, labels = _data()
    world, batch = 2, 6
    seen = []
    for rank in range(world):
        loader = BatchLoader(images, labels, batch, seed=1, repeats=K, rank=rank, world_size=world)
        assert len(loader) == N // world // batch
        pixels = []
        for x, _ in _epoch(loader, 2):
            assert sorted(Counter(_pixels(x)).values()) == [K] * (batch // K)
            pixels += set(_pixels(x))
        seen.append(set(pixels))
        assert len(pixels) == len(seen[-1]) == loader.num_distinct == N // world // batch * batch // K
    assert not seen[0] & seen[1]


def test_repeats_that_do_not_divide_the_batch_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, None, ["batch_size=16", "data.repeats=3"])
    assert str(info.value) == "override: data.repeats=3: batch_size=16 is not divisible by it"
    with pytest.raises(ConfigError) as info:
        load_config(None, None, ["batch_size=12", "accumulation=2", "data.repeats=4"])
    message = "override: data.repeats=4: batch_size=12 / accumulation=2 is not divisible by it"
    assert str(info.value) == message
    assert load_config(None, None, ["batch_size=12", "accumulation=2", "data.repeats=3"]).data.repeats == 3
    images, labels = _data()
    with pytest.raises(ValueError, match="repeats=3: a batch of 8 per process is not divisible by it"):
        BatchLoader(images, labels, 8, repeats=3)
    with pytest.raises(ValueError, match="repeats=2: expected 1, or more for training batches"):
        BatchLoader(images, labels, 8, repeats=2, shuffle=False, drop_last=False)
    for name in config_preset_names():
        assert load_config(name).data.repeats == 1, name


def test_a_resumed_run_with_repeats_is_bit_exact(tmp_path: Path) -> None:
    cache = make_tiny_cache(tmp_path / "data", train_per_class=20, val_per_class=5)  # 80 images: 5 steps
    cfg = load_config(None, None, [*tiny_overrides(cache, 3), "data.repeats=2", "augment.crop=pad"])
    run = setup_run(cfg, DistContext(), say=lambda _m: None)
    assert run.loader.repeats == 2 and run.iters_per_epoch == 80 // 16
    first, _ = next(iter(run.loader))
    assert sorted(Counter(_pixels(first)).values()) == [2] * 8
    train(cfg, tmp_path / "reference", progress=False, log=lambda _m: None)

    class Stop(Exception):
        pass

    def stop_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/"):
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "resumed", progress=False, log=stop_after_epoch_2)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    train(cfg, tmp_path / "resumed", resume=True, progress=False, log=lambda _m: None)
    _assert_same_run(tmp_path / "reference", tmp_path / "resumed")
