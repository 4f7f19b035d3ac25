"""Several processes for one training run: torchrun's environment -> a process group and a `DistContext`.

Launch with torchrun (one process per GPU, or several on a CPU):

    torchrun --nproc_per_node=8 -m tinyswin train --data DATA --preset NAME
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        -m tinyswin train --data DATA --preset NAME

torchrun gives every worker RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
`distributed()` reads them, picks the backend (nccl when the run's device is CUDA, gloo on the CPU), binds
the process to GPU LOCAL_RANK and destroys the group at the end. Without torchrun, or with one process, no
group is made and training runs as a single process.

Failures: when a worker dies, torchrun's agent stops the others and exits non-zero, naming the failed rank
in its summary. A worker that hangs (alive but stuck) leaves the others waiting in a collective; every
collective gives up after the timeout, `$TINYSWIN_DIST_TIMEOUT` seconds (default 300), with an error, the
waiting ranks then check which ranks still answer and name the silent ones, and the job exits non-zero.
The timeout bounds every collective, including the first one after start-up, so keep it above the slowest
step (an epoch's evaluation on rank 0 and the checkpoint write before the end-of-epoch barrier).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from tinyswin.runtime import DistContext, resolve_device

TIMEOUT_ENV = "TINYSWIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# how long the ranks that saw a failed collective wait for each other before naming the silent ones
_PROBE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun tells one worker about the job."""

    rank: int
    world_size: int
    local_rank: int


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died or hangs; the message names them if known."""


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The worker's place from torchrun's variables, or None when the process was not started by torchrun.

    Raises:
        ValueError: a variable is not an integer, or the ranks are inconsistent.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        raw = env.get(key, "0")
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"environment variables RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} disagree"
        )
    return LaunchEnv(rank=rank, world_size=world, local_rank=local)


def dist_timeout(environ: Mapping[str, str] | None = None) -> float:
    """Seconds a collective may wait: `$TINYSWIN_DIST_TIMEOUT`, else 300.

    Raises:
        ValueError: the variable is not a positive number.
    """
    env = os.environ if environ is None else environ
    raw = env.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"environment variable {TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def distributed(
    device: str = "auto",
    *,
    timeout: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[DistContext]:
    """The process group of a torchrun job for the duration of the block; yields this process's context.

    Args:
        device: the run's device setting ('auto', 'cpu', 'cuda', ...): CUDA means nccl and one GPU per
            local rank, anything else gloo.
        timeout: seconds a collective may wait (None: `dist_timeout()`).
        environ: the variables to read (None: os.environ).

    Yields:
        DistContext(rank, world_size, local_rank); `DistContext()` without torchrun or with one process.

    Raises:
        DistributedError: a collective inside the block failed (a rank died or hangs), naming the ranks
            that no longer answer when they can be found.
    """
    env = launch_env(environ)
    if env is None or env.world_size == 1:
        yield DistContext(rank=env.rank if env else 0, world_size=1, local_rank=env.local_rank if env else 0)
        return
    seconds = dist_timeout(environ) if timeout is None else float(timeout)
    ctx = DistContext(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank)
    dev = resolve_device(device, ctx)
    if dev.type == "cuda":
        if dev.index is None:  # 'cuda': this process's GPU
            dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    backend = backend_for(dev)
    delta = datetime.timedelta(seconds=seconds)
    tdist.init_process_group(backend=backend, timeout=delta)
    # a separate gloo group on which the survivors of a failed collective find the ranks that no longer answer
    probe = tdist.new_group(backend="gloo", timeout=delta)
    try:
        yield ctx
    except Exception as exc:
        if not _is_collective_failure(exc):
            raise
        silent = _silent_ranks(probe, ctx, min(seconds, _PROBE_TIMEOUT_S))
        who = f"rank(s) {', '.join(map(str, silent))} did not answer" if silent else "another rank failed"
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size}: a collective failed or timed out after {seconds:g} s "
            f"({TIMEOUT_ENV}): {who}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    else:
        tdist.destroy_process_group()


def _is_collective_failure(exc: BaseException) -> bool:
    """A torch.distributed error, or the RuntimeError gloo raises on a timeout or a lost peer."""
    if isinstance(exc, tdist.DistError):
        return True
    text = str(exc)
    markers = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer", "/gloo/")
    return type(exc) is RuntimeError and any(m in text for m in markers)


def _silent_ranks(probe: tdist.ProcessGroup, ctx: DistContext, seconds: float) -> list[int]:
    """Ranks that do not reach a monitored barrier within `seconds` (rank 0's view; [] elsewhere)."""
    try:
        tdist.monitored_barrier(group=probe, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
    except Exception as exc:  # the barrier's error names the silent ranks; any other error: unknown
        text = str(exc)
        print(f"rank {ctx.rank}: {text.splitlines()[0] if text else exc!r}", file=sys.stderr)
        return _ranks_in(text)
    return []


def _ranks_in(text: str) -> list[int]:
    """The ranks named in monitored_barrier's error ('Ranks 1, 3 failed to pass monitoredBarrier ...')."""
    match = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", text)
    if not match:
        return []
    return [int(r) for r in re.findall(r"\d+", match.group(1))]
