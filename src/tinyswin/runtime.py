"""Where a run computes: its place among the processes, its device and precision, and the collectives.

`DistContext` says which rank this process is among how many (`tinyswin.distributed` builds it from
torchrun's environment). With one process every collective here is a no-op.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints."""
        return self.rank == 0


def resolve_device(name: str, dist: DistContext | None = None) -> torch.device:
    """'auto' -> cuda (this process's local GPU) when available, else cpu; anything else as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank if dist else torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 autocast trains
    faster than fp32; elsewhere bf16 is emulated and slower."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool, str | None]:
    """The autocast dtype (None = fp32), whether a GradScaler is needed, and a note when a request is changed.

    'auto': bf16 on CUDA where supported, else fp16 with a GradScaler; on the CPU bf16 where the CPU has
    bf16 instructions (`cpu_has_bf16`: 1.3-1.6x the images per second of fp32 for the small Swins measured
    in benchmarks/RESULTS.md), else fp32. 'fp16' on CPU runs fp32 (fp16 with loss scaling is a CUDA recipe;
    CPU autocast is bf16), with a note.
    """
    if precision == "fp32":
        return None, False, None
    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if precision == "bf16":
            return torch.bfloat16, False, None
        return torch.float16, True, None
    if precision == "bf16" or (precision == "auto" and device.type == "cpu" and cpu_has_bf16()):
        return torch.bfloat16, False, None
    if precision == "fp16":
        return None, False, "precision=fp16 is for CUDA; running fp32 on the CPU"
    return None, False, None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """torch.autocast for `dtype`, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def all_reduce_(tensor: torch.Tensor, dist: DistContext | None) -> torch.Tensor:
    """In place: the sum of `tensor` over all processes (unchanged with one process)."""
    if dist is not None and dist.world_size > 1:
        tdist.all_reduce(tensor)
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor, dist: DistContext, device: torch.device) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (through `device`, which the backend needs), returned on the CPU."""
    if dist.world_size == 1:
        return tensor
    on_device = tensor.to(device)
    tdist.broadcast(on_device, src=0)
    return on_device.cpu()


def barrier(dist: DistContext) -> None:
    """Wait for every process (no-op with one)."""
    if dist.world_size > 1:
        tdist.barrier()


def wrap_model(
    model: nn.Module, compile_model: bool, dist: DistContext, device: torch.device, mode: str = "default"
) -> tuple[nn.Module, nn.Module]:
    """The model to train (DDP with several processes, compiled if asked) and the one to evaluate.

    Args:
        model: the plain module.
        compile_model: `torch.compile` it (static shapes).
        dist, device: DDP wraps the model when there are several processes.
        mode: torch.compile's mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune',
            'max-autotune-no-cudagraphs'.
    """
    train_model: nn.Module = model
    if dist.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if not compile_model:
        return train_model, model
    # static shapes: one graph per batch shape (train, eval, a last partial eval batch); dynamic-shape
    # graphs of the windowed attention failed to run under inductor (torch 2.11, H100)
    train_model = torch.compile(train_model, dynamic=False, mode=mode)
    if dist.world_size == 1:
        return train_model, train_model
    return train_model, torch.compile(model, dynamic=False, mode=mode)


class StopSignals:
    """Within a `with` block, SIGINT and SIGTERM ask the training to stop instead of killing it mid-write.

    The first signal only records itself (`received`); the loop asks after each step and stops between two
    steps, so no file is left half-written. A second one raises KeyboardInterrupt at once. Handlers are
    installed only in the main thread and only when `enabled` (with several processes every rank would
    stop at a different step, so there the signals keep their default action).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
