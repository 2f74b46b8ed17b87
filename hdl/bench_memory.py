"""Peak memory of one call, for ``hdl-bench``: CUDA's peak allocation on GPU, peak resident
memory (VmHWM, reset through ``/proc/self/clear_refs``) on CPU."""

from __future__ import annotations

import ctypes
import gc
import resource
from collections.abc import Callable
from pathlib import Path

import torch

_MB = 2.0**20


def _status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    """Give freed heap back to the OS (so a step's allocations show in RSS) and reset VmHWM."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_peak(fn: Callable[[], None], device: torch.device) -> dict[str, float | str]:
    """Run ``fn`` once; return the peak (MB), the rise over the memory in use before it (MB)
    and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / _MB, "step_mb": (peak - before) / _MB, "memory": "cuda_peak"}
    reset = _reset_cpu_peak()
    before_kb = _status_kb("VmRSS")
    fn()
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None or before_kb is None:  # no procfs: the process-lifetime peak only
        peak_kb = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return {"peak_mb": peak_kb / 1024, "step_mb": float("nan"), "memory": "ru_maxrss"}
    return {
        "peak_mb": peak_kb / 1024,
        "step_mb": (peak_kb - before_kb) / 1024,
        "memory": "cpu_rss_peak",
    }
