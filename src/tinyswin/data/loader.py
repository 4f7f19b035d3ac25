"""Batches from a cache split: seeded shuffling, sharding across processes, the whole split on the device.

Order and sharding (``N`` images, ``W = world_size`` processes, per-rank batch size ``B``):

- each epoch's order is ``torch.randperm(N)`` drawn with a CPU ``torch.Generator`` seeded from
  ``(seed, epoch)`` only (``arange(N)`` when ``shuffle=False``), so every rank computes the same order;
- ``drop_last=True`` (training): the order is cut to ``W * (N // W)`` samples and rank ``r`` takes
  ``order[r::W]``: equal-size, disjoint shards; each rank then drops its last partial batch, so all ranks run
  the same number of steps;
- ``drop_last=False`` (evaluation): rank ``r`` takes ``order[r::W]`` over all ``N`` samples and keeps its
  last partial batch, so every sample is seen exactly once across the ranks. Shards then differ in size by at
  most one (ranks ``r < N % W`` hold one more), and so may their batch counts: sum the per-rank totals (e.g.
  correct predictions and counts) with an all-reduce after the loop, not per batch.

The permutation does not advance by itself: call :meth:`BatchLoader.set_epoch` before each epoch.

Repeated augmentation (``repeats=k > 1``, training only; Hoffer et al. 2020, "Augment your batch", as DeiT
trains): each batch of ``B`` holds ``B / k`` images of the rank's shard, each ``k`` times in a row
(``[a, a, a, b, b, b, ...]``); the augmentation draws per sample, so the copies are augmented differently.
The epoch keeps its number of steps, so it takes the first ``num_samples / k`` images of the rank's shard of
the same seeded permutation (about ``N / k`` distinct images, each ``k`` times; another ``N / k`` the next
epoch). DeiT's ``RASampler`` (timm's ``RepeatAugSampler``) interleaves the repeats the same way but then
strides them across the ranks (``indices[rank::W]``), so the ``k`` copies of an image land on different
processes and the repetition shows only in the global batch (with one process, consecutively in its
batch); it also cuts each rank's epoch to ``N // 256 * 256 / W`` samples. Here the copies stay within one
rank's (micro-)batch, so a batch's make-up is the same with any number of processes, and the shards stay
disjoint as above.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from tinyswin.seeding import epoch_seed


def _as_tensor(array: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(dtype)
    if isinstance(array, np.memmap) or not array.flags.writeable:
        array = np.array(array, copy=True)  # a cache memmap is read into memory once
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


class BatchLoader:
    """Iterates over a split in batches of uint8 images and int64 labels on a device.

    Args:
        images: uint8 (N, H, W, 3) array (a cache memmap is fine) or tensor.
        labels: integer (N,) array or tensor.
        batch_size: images per batch for this rank.
        shuffle: a new seeded order every epoch; False keeps the split's order.
        drop_last: drop each rank's last partial batch and trim the epoch to equal shards (training); False
            sees every sample exactly once across ranks (evaluation).
        seed: seed of the epoch permutations.
        rank: this process's index in ``0..world_size-1``.
        world_size: number of processes sharing the epoch.
        device: where the split lives and the batches are gathered. On CUDA, a split that does not fit on the
            device stays in pinned CPU memory and each batch is copied over (``self.resident`` is then False).
        repeats: copies of each image in a batch (repeated augmentation, see the module's notes); 1: none.
            More than 1 needs ``drop_last`` and a ``batch_size`` divisible by it.

    Yields:
        (images uint8 (B, H, W, 3), labels int64 (B,)) on ``device``.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        repeats: int = 1,
    ) -> None:
        is_uint8 = images.dtype == (torch.uint8 if isinstance(images, torch.Tensor) else np.uint8)
        if images.ndim != 4 or images.shape[-1] != 3 or not is_uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if tuple(labels.shape) != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if repeats < 1 or (repeats > 1 and not drop_last):
            raise ValueError(f"repeats={repeats}: expected 1, or more for training batches (drop_last=True)")
        if batch_size % repeats:
            raise ValueError(f"repeats={repeats}: a batch of {batch_size} per process is not divisible by it")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        if drop_last and images.shape[0] // world_size < batch_size:
            raise ValueError(
                f"{images.shape[0]} images over {world_size} rank(s) do not fill one batch of {batch_size} "
                "with drop_last=True"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.repeats = repeats
        self.device = torch.device(device)
        self.epoch = 0
        self.num_total = int(images.shape[0])
        images_t = _as_tensor(images, torch.uint8)
        labels_t = _as_tensor(labels, torch.int64)
        self.resident = True
        if self.device.type == "cuda":
            try:
                images_t, labels_t = images_t.to(self.device), labels_t.to(self.device)
            except torch.cuda.OutOfMemoryError:
                self.resident = False
                images_t, labels_t = images_t.pin_memory(), labels_t.pin_memory()
        else:
            images_t, labels_t = images_t.to(self.device), labels_t.to(self.device)
        self.images = images_t
        self.labels = labels_t
        self._rows = images_t.reshape(images_t.shape[0], -1)  # (N, H*W*3): row gathers are plain copies

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        if self.drop_last:
            return (self.num_total // self.world_size) // self.batch_size * self.batch_size
        return len(range(self.rank, self.num_total, self.world_size))

    @property
    def num_distinct(self) -> int:
        """Distinct images this rank yields per epoch (``num_samples / repeats``)."""
        return self.num_samples // self.repeats

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The epoch's order of all N samples (the same on every rank).

        Returns:
            int64 (N,) on the CPU.
        """
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_total)
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(self.num_total, generator=generator)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """The sample indices this rank yields in an epoch, in order (batch after batch); with ``repeats``,
        the shard's first ``num_distinct`` indices, each ``repeats`` times in a row.

        Returns:
            int64 (num_samples,) on the CPU.
        """
        order = self.order(epoch)
        if self.drop_last:
            order = order[: self.num_total // self.world_size * self.world_size]
        shard = order[self.rank :: self.world_size]
        if self.repeats > 1:
            return shard[: self.num_distinct].repeat_interleave(self.repeats)  # (num_samples,)
        return shard[: self.num_samples]

    def _gather(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``batch``: (images uint8 (B, H, W, 3), labels int64 (B,)) on the device of the split."""
        shape = (len(batch), *self.images.shape[1:])
        if self.images.device.type == "cpu":  # numpy's row gather is several times faster than torch's here
            rows = np.take(self._rows.numpy(), batch.numpy(), axis=0)  # (B, H*W*3)
            return torch.from_numpy(rows).view(shape), self.labels[batch]
        return torch.index_select(self._rows, 0, batch).view(shape), torch.index_select(self.labels, 0, batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.indices()
        if self.images.device.type != "cpu":
            index = index.to(self.images.device)
        for start in range(0, len(index), self.batch_size):
            images, labels = self._gather(index[start : start + self.batch_size])
            if images.device != self.device:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
