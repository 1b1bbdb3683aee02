"""The GPUs of this machine, and `--gpu N` / `--gpus all|0,1` checked against them.

Indices are nvidia-smi's (NVML numbers cards by PCI bus, as docker's `device_ids` do); a worker pinned to
card N gets CUDA_DEVICE_ORDER=PCI_BUS_ID and CUDA_VISIBLE_DEVICES=N, so CUDA means the same card.
"""

from __future__ import annotations

from jobs.presence import WORKER_GPU

NO_GPU = "no GPU found on this machine (NVML and CUDA see none); without --gpu(s), one worker runs on the CPU"


class GpuChoiceError(ValueError):
    """A --gpu or --gpus value that names no GPU of this machine."""


def visible_gpu_count() -> int:
    """How many GPUs this machine has: NVML's count, else torch's (NVML missing), 0 on a machine with none."""
    count = _nvml_count()
    return count if count is not None else _torch_count()


def _nvml_count() -> int | None:
    # NVML answers without creating a CUDA context, so `up` holds no memory on the cards its workers use.
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver or no NVML library (a CPU machine, some containers)
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _torch_count() -> int:
    import torch  # only when NVML is missing: importing torch takes seconds

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpu(gpu: int, visible: int) -> int:
    """`gpu` if this machine has it, else GpuChoiceError naming the ones it has."""
    if visible == 0:
        raise GpuChoiceError(NO_GPU)
    if not 0 <= gpu < visible:
        have = "GPU 0" if visible == 1 else f"GPUs 0-{visible - 1}"
        raise GpuChoiceError(f"GPU {gpu} is not on this machine: it has {have} (as nvidia-smi numbers them)")
    return gpu


def parse_gpus(text: str, visible: int) -> list[int]:
    """The GPUs `--gpus` names: `all`, or indices such as `0,1`, each on this machine and named once."""
    spelled = text.strip().lower()
    parts = [part.strip() for part in spelled.split(",")]
    if spelled != "all" and not all(part.isdigit() for part in parts):
        raise GpuChoiceError(f"--gpus takes all or GPU indices such as 0,1, not {text!r}")
    if visible == 0:
        raise GpuChoiceError(NO_GPU)
    if spelled == "all":
        return list(range(visible))
    chosen = [int(part) for part in parts]
    twice = sorted({gpu for gpu in chosen if chosen.count(gpu) > 1})
    if twice:
        raise GpuChoiceError(f"--gpus names GPU {twice[0]} twice: one worker per GPU")
    return [check_gpu(gpu, visible) for gpu in chosen]


def gpu_worker_name(gpu: int) -> str:
    """The name of the worker of GPU `gpu`: its Celery node (`worker-gpu1@host`) and its log."""
    return f"worker-gpu{gpu}"


def worker_env(gpu: int | None) -> dict[str, str]:
    """The environment that pins a worker to GPU `gpu` before CUDA starts (nothing for an unpinned one).

    CUDA numbers cards fastest first unless told PCI_BUS_ID; nvidia-smi and docker number them by bus.
    """
    if gpu is None:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(gpu), WORKER_GPU: str(gpu)}
