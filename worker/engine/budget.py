"""The VRAM budget: a hard allocator cap, so the process OOMs instead of spilling into shared memory."""

from __future__ import annotations

import math

import psutil
import torch

from worker.engine.costs import GB, Budget

# What `auto` leaves free for the CUDA context, cuBLAS workspaces and other processes' growth.
AUTO_DEVICE_RESERVE = int(0.75 * GB)
# What `auto` leaves to the OS and other programs when pinning host memory.
AUTO_HOST_RESERVE = 4 * GB
CAP_MARGIN = 64 * 1024**2


def parse_gigabytes(value: str) -> float | None:
    """'auto' -> None, else a positive number of gigabytes."""
    text = value.strip().lower()
    if text == "auto":
        return None
    gigabytes = float(text)
    if not math.isfinite(gigabytes) or gigabytes <= 0:
        raise ValueError(f"a budget must be positive or 'auto', got {value!r}")
    return gigabytes


def resolve_budget(device_budget: str, host_budget: str, device: torch.device) -> Budget:
    """Turn the settings into bytes: auto = free memory now minus a reserve."""
    device_gb = parse_gigabytes(device_budget)
    host_gb = parse_gigabytes(host_budget)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        device_bytes = int(device_gb * GB) if device_gb else max(0, free - AUTO_DEVICE_RESERVE)
    else:
        device_bytes = int(device_gb * GB) if device_gb else 1 << 62  # the CPU has no VRAM to cap
    available = psutil.virtual_memory().available
    host_bytes = int(host_gb * GB) if host_gb else max(0, available - AUTO_HOST_RESERVE)
    return Budget(device_bytes=device_bytes, host_pinned_bytes=host_bytes)


def apply_device_cap(budget: Budget, device: torch.device) -> float | None:
    """Cap the caching allocator at the budget; returns the fraction set (None on the CPU).

    The cap covers the caching allocator only; the CUDA context lives outside it, which is why
    `auto` keeps a reserve.
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    # Segments are mapped in 2 MiB pages; stay a little under so reserved never reads above the budget.
    fraction = min(1.0, max(0, budget.device_bytes - CAP_MARGIN) / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
