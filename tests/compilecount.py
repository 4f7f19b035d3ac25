"""What torch.compile does with a model, counted: the graphs it traces, its graph breaks, its recompilations,
and the host reads of tensor values around them.

`CompileCounter` is a torch._dynamo backend that records every graph it is given (and runs it as traced, with
no inductor: a CPU test sees what a GPU run would trace, in seconds), with the graph breaks
(`torch._dynamo.utils.counters["graph_break"]`) and the recompilations that dynamo reports (its 'recompiles'
log, the one `TORCH_LOGS=recompiles` prints). `HostReads` counts the operations that hand a tensor's values to
the host, by a TorchDispatchMode and by the Tensor methods that read without dispatching on a CPU tensor.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode


class _Records(logging.Handler):
    """Keeps the messages of dynamo's artifact loggers that end with one of `names`."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(logging.DEBUG)
        self.names = names
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith(self.names):
            self.messages.append(record.getMessage())


class CompileCounter:
    """A torch._dynamo backend that counts. Install with `counting(monkeypatch)`.

    Attributes:
        graphs: (grad mode when traced, the number of its calls to torch functions and modules) per graph:
            True for a training graph, False for an evaluation graph.
    """

    def __init__(self) -> None:
        self.graphs: list[tuple[bool, int]] = []
        self._log = _Records(("__recompiles", "__graph_breaks"))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        calls = sum(node.op in ("call_function", "call_method", "call_module") for node in gm.graph.nodes)
        self.graphs.append((torch.is_grad_enabled(), calls))
        return gm.forward

    def restart(self) -> None:
        """Forget every compiled graph and count from zero, as a new process would."""
        torch._dynamo.reset()
        self.clear()

    def clear(self) -> None:
        """Count from zero (the graphs compiled so far stay compiled)."""
        counters.clear()
        self.graphs.clear()
        self._log.messages.clear()

    @property
    def training_graphs(self) -> int:
        return sum(grad for grad, _ in self.graphs)

    @property
    def evaluation_graphs(self) -> int:
        return sum(not grad for grad, _ in self.graphs)

    @property
    def breaks(self) -> int:
        """Graph breaks since the last reset."""
        return sum(counters["graph_break"].values())

    @property
    def recompiles(self) -> list[str]:
        """dynamo's 'Recompiling function ...' messages since the last reset."""
        return [m for m in self._log.messages if m.startswith("Recompiling function")]

    def summary(self) -> str:
        """One line: graphs (training / evaluation), breaks and their reasons, the first recompilation."""
        reasons = sorted({reason.splitlines()[0] for reason in counters["graph_break"]})[:3]
        first = self.recompiles[0].splitlines()[:3] if self.recompiles else []
        return (
            f"{self.training_graphs} training + {self.evaluation_graphs} evaluation graphs, {self.breaks} "
            f"graph breaks {reasons}, {len(self.recompiles)} recompiles {first}"
        )

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """Within the block, dynamo's 'recompiles' and 'graph_breaks' logs are on and recorded."""
        torch._logging.set_logs(recompiles=True, graph_breaks=True)
        dynamo = logging.getLogger("torch._dynamo")  # the artifact loggers' parent; it does not propagate
        dynamo.addHandler(self._log)
        try:
            yield
        finally:
            dynamo.removeHandler(self._log)
            torch._logging.set_logs()


@contextlib.contextmanager
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[CompileCounter]:
    """Every `torch.compile` in the block compiles with a fresh `CompileCounter` (the modes and static
    shapes asked for are kept; the backend replaces inductor), from a reset dynamo."""
    counter = CompileCounter()
    real = getattr(torch.compile, "real_compile", torch.compile)  # inside another `counting`: torch's own

    def compile_counting(fn: Any = None, **kwargs: Any) -> Any:
        kwargs["backend"] = counter
        return real(fn, **kwargs)

    compile_counting.real_compile = real  # type: ignore[attr-defined]

    counter.restart()
    with monkeypatch.context() as patch, counter.logging():
        patch.setattr(torch, "compile", compile_counting)
        yield counter
    torch._dynamo.reset()


# ops that hand tensor values (or a shape that depends on them) to the host
_READ_OPS = ("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "allclose")


class HostReads(TorchDispatchMode):
    """Counts, by name, the operations that read tensor values on the host: scalar reads and data-dependent
    shapes (seen by dispatch, in compiled graphs too) and `tolist` / `numpy` / `cpu` (which a CPU tensor
    serves without dispatching: counted by patching the Tensor methods)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self._patch = pytest.MonkeyPatch()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Compiled code runs as compiled under this mode (it would otherwise run eagerly), and the mode sees
        the operations of its graphs (CompileCounter's run as traced)."""
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name.startswith(_READ_OPS):
            self._count(name)
        return func(*args, **(kwargs or {}))

    def _count(self, name: str) -> None:
        """One read by `name`, filed under the innermost tinyswin function that made it."""
        for frame in reversed(traceback.extract_stack()):
            path = Path(frame.filename)
            if "tinyswin" in path.parts and path.parent.name != "tests":
                self.counts[f"{path.stem}.{frame.name}: {name}"] += 1
                return
        self.counts[f"?: {name}"] += 1

    def __enter__(self) -> HostReads:
        for method in ("tolist", "numpy", "cpu"):
            original = getattr(torch.Tensor, method)

            def counted(self_: torch.Tensor, *a: Any, _o: Any = original, _m: str = method, **k: Any) -> Any:
                self._count(_m)
                return _o(self_, *a, **k)

            self._patch.setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._patch.undo()
