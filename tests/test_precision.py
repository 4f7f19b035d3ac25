"""`precision`: what each value resolves to on the CPU, and the CPU's bf16 detection against /proc/cpuinfo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyswin import runtime
from tinyswin.runtime import cpu_has_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("precision", "native", "expected"),
    [
        ("auto", True, torch.bfloat16),  # the CPU has bf16 instructions: bf16 autocast is faster
        ("auto", False, None),  # emulated bf16 is slower than fp32: stay in fp32
        ("bf16", False, torch.bfloat16),  # asked for: given, native or not
        ("fp32", True, None),
        ("fp16", True, None),  # fp16 is a CUDA recipe (with a note)
    ],
)
def test_cpu_precision(monkeypatch: pytest.MonkeyPatch, precision: str, native: bool, expected) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    dtype, scaler, note = resolve_precision(precision, CPU)
    assert dtype == expected and scaler is False
    assert (note is not None) == (precision == "fp16")


def test_bf16_detection_matches_the_cpu_flags() -> None:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system to read the CPU's flags from")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("/proc/cpuinfo lists no CPU flags here")
    assert cpu_has_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)
