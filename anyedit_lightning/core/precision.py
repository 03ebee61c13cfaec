"""Which reduced precision, if any, pays for a compute-bound step on the device at hand.

A bf16 autocast only speeds a step up where the hardware multiplies bf16 natively (Ampere or later GPUs,
x86 CPUs with AVX512-BF16 or AMX); elsewhere it emulates bf16 and is slower than float32. ``"auto"``
settings resolve here, once per call, from the device the weights are on (docs/algorithm.md §4.3).
"""

from __future__ import annotations

import functools
import sys

import torch

AUTO = "auto"
_NATIVE_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively (so a bf16 autocast is faster than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _NATIVE_CPU_FLAGS)
    return False


def resolve_compute_dtype(name: str | None, device: torch.device, weights_dtype: torch.dtype) -> str | None:
    """``"auto"``: ``"bfloat16"`` for float32 weights on a device with native bf16, else None (the weights'
    own dtype); any other ``name`` is returned as given."""
    if name != AUTO:
        return name
    return "bfloat16" if weights_dtype == torch.float32 and native_bf16(device) else None
