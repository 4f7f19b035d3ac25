"""Where a run computes: its place among the processes, its device and precision, and the collectives.

`DistContext` says which rank this process is among how many (`tinyswin.distributed` builds it from
torchrun's environment). With one process every collective here is a no-op.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
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


def compile_static(fn: Any, mode: str = "default") -> Any:
    """`torch.compile(fn)` with static shapes, the way every compiled path of a run is compiled.

    Static shapes: one graph per input shape (a run meets one for training and one for evaluation, whose last
    batch is padded); dynamic-shape graphs of the windowed attention failed to run under inductor (torch
    2.11, H100: `NameError: name 's27' is not defined`).

    Args:
        fn: a module or a function.
        mode: torch.compile's mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune',
            'max-autotune-no-cudagraphs'.
    """
    return torch.compile(fn, dynamic=False, mode=mode)


def _evaluation_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward pass of evaluation. A function of its own, so that torch.compile keeps the evaluation graph
    under its own code object: the training graph stays the one entry of the model's `forward`, and switching
    between training and evaluation never recompiles (nor hits the recompile limit)."""
    return model(x)


class EvalModel(nn.Module):
    """A model as evaluation calls it: through one compiled evaluation function (`compile_static` of
    `_evaluation_forward`), or directly when `forward_fn` is None.

    Args:
        module: the plain model (its `eval()` and parameters are this module's).
        forward_fn: the compiled evaluation function, or None.
    """

    def __init__(self, module: nn.Module, forward_fn: Any = None) -> None:
        super().__init__()
        self.module = module
        self.forward_fn = forward_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, K) logits of the wrapped model."""
        if self.forward_fn is None:
            return self.module(x)
        return self.forward_fn(self.module, x)


@contextlib.contextmanager
def weights_of(model: nn.Module, source: nn.Module | None) -> Iterator[None]:
    """Within the block, `model`'s parameters hold those of `source` (a copy of the same architecture, e.g.
    the EMA's), copied in place: graphs compiled for `model`, CUDA graphs included, evaluate `source`'s
    weights without a graph of their own. They are put back bit for bit on leaving (on an error too).
    `source` None: nothing changes.
    """
    if source is None:
        yield
        return
    params = [p.detach() for p in model.parameters()]
    saved = [p.clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(params, [p.detach() for p in source.parameters()])
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, saved)


def wrap_model(
    model: nn.Module, compile_model: bool, dist: DistContext, device: torch.device, mode: str = "default"
) -> tuple[nn.Module, nn.Module]:
    """The model to train (DDP with several processes, compiled if asked) and the one to evaluate.

    Compiled, a run holds two graphs: the training forward (`model.forward`, DDP's with several processes)
    and the evaluation forward (`EvalModel`: a function of its own, so neither is a recompile of the other).
    A `SwinTransformer` builds the plans of its input size before this (`SwinTransformer.prepare`), so both
    are traced whole: no graph break, no host read.

    Args:
        model: the plain module, on `device`.
        compile_model: `torch.compile` both (static shapes, `compile_static`).
        dist, device: DDP wraps the model when there are several processes.
        mode: torch.compile's mode: 'default', 'reduce-overhead' (CUDA graphs), 'max-autotune',
            'max-autotune-no-cudagraphs'.
    """
    train_model: nn.Module = model
    if dist.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if not compile_model:
        return train_model, EvalModel(model)
    return compile_static(train_model, mode), EvalModel(model, compile_static(_evaluation_forward, mode))


class StopSignals:
    """Within a `with` block, SIGINT and SIGTERM ask the training to stop instead of killing it mid-write.

    The first signal only records itself (`received`); the loop asks after each step and stops between two
    steps, so no file is left half-written. A second one raises KeyboardInterrupt at once, and so does the
    first when `immediate` (work that writes nothing, such as compiling: stopping at once loses nothing).
    Handlers are installed only in the main thread and only when `enabled` (with several processes every
    rank would stop at a different step, so there the signals keep their default action).
    """

    def __init__(self, enabled: bool = True, immediate: bool = False) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.immediate = immediate
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        first = self.received is None
        self.received = self.received or signum
        if self.immediate or not first:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
