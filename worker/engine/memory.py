"""Memory probes: device memory from NVML (or torch), peaks from the caching allocator, host RSS."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch


@dataclass(frozen=True)
class DeviceMemory:
    """Device-wide memory in bytes at one moment (every process, the CUDA context included)."""

    total: int
    used: int
    free: int


def device_memory(device: torch.device) -> DeviceMemory | None:
    """NVML where it works, else `torch.cuda.mem_get_info`, else None on the CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _nvml_memory(index) or _torch_memory(index)


def device_uuid(device: torch.device) -> str | None:
    """The CUDA device's UUID as nvidia-smi prints it (GPU-...); None on the CPU.

    It names one card whatever the index: a worker pinned with CUDA_VISIBLE_DEVICES=1, or a container given
    the host's second card, sees it as device 0.
    """
    if device.type != "cuda":
        return None
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


_nvml_ready: bool | None = None


def _nvml_memory(index: int) -> DeviceMemory | None:
    global _nvml_ready
    try:
        import pynvml

        if _nvml_ready is None:
            pynvml.nvmlInit()  # once per process: it costs milliseconds, and jobs read memory twice
            _nvml_ready = True
        # By UUID, not index: NVML numbers every card of the machine and ignores CUDA_VISIBLE_DEVICES, so
        # CUDA's device 0 of a worker pinned to the second card is NVML's device 1.
        handle = pynvml.nvmlDeviceGetHandleByUUID(device_uuid(torch.device("cuda", index)))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return DeviceMemory(total=int(info.total), used=int(info.used), free=int(info.free))
    except Exception:  # no NVML library (WSL, some containers): fall back to the CUDA runtime
        return None


def _torch_memory(index: int) -> DeviceMemory:
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(total=int(total), used=int(total - free), free=int(free))


def host_rss_bytes() -> int:
    """This process's resident set size."""
    return int(psutil.Process().memory_info().rss)


def reset_for_job(device: torch.device) -> None:
    """Restart the peak counters, so each job's peak is its own."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> tuple[int | None, int | None]:
    """Peak allocated and reserved bytes since the last reset; None on the CPU."""
    if device.type != "cuda":
        return None, None
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def device_name(device: torch.device) -> str:
    """A human name for the device jobs run on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
