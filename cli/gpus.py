"""The GPUs of this machine, and `--gpu N` / `--gpus all|0,1` checked against them.

Indices are nvidia-smi's (NVML numbers cards by PCI bus, as docker's `device_ids` do); a worker pinned to
card N gets CUDA_DEVICE_ORDER=PCI_BUS_ID and CUDA_VISIBLE_DEVICES=N, so CUDA means the same card.
Where the user already set CUDA_VISIBLE_DEVICES, the indices are positions in its list instead: `--gpu 1`
with CUDA_VISIBLE_DEVICES=2,3 pins the worker to card 3 (the list keeps the meaning the user gave it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from jobs.presence import WORKER_GPU, pinned_gpu

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
NO_GPU = "no GPU found on this machine (NVML and CUDA see none); without --gpu(s), one worker runs on the CPU"
SMI_NUMBERING = "as nvidia-smi numbers them"
# Run in a child when NVML is missing: torch's count starts CUDA, which then keeps the CUDA_VISIBLE_DEVICES it
# started with; the CLI must still be able to pin itself (`worker --gpu N` checks its device after pinning).
TORCH_COUNT = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"


class GpuChoiceError(ValueError):
    """A --gpu or --gpus value that names no GPU of this machine."""


def listed_devices(environ: Mapping[str, str]) -> list[str] | None:
    """The devices CUDA_VISIBLE_DEVICES lists, as CUDA reads it (None when it is unset).

    CUDA stops at the first entry that is no index or UUID, so `-1` (a common way to hide every card)
    lists none.
    """
    text = environ.get(CUDA_VISIBLE_DEVICES)
    if text is None:
        return None
    listed: list[str] = []
    for entry in (part.strip() for part in text.split(",")):
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        listed.append(entry)
    return listed


def numbering(environ: Mapping[str, str]) -> str:
    """How --gpu(s) indices are read here, for error messages."""
    listed = listed_devices(environ)
    if listed is None:
        return SMI_NUMBERING
    return f"positions in CUDA_VISIBLE_DEVICES={environ[CUDA_VISIBLE_DEVICES]}"


def visible_gpu_count(environ: Mapping[str, str] | None = None) -> int:
    """How many GPUs --gpu(s) can name: those CUDA_VISIBLE_DEVICES lists when it is set, else the machine's.

    The machine's count is NVML's, else torch's in a child process (NVML missing), 0 on a machine with none.
    """
    listed = listed_devices(os.environ if environ is None else environ)
    if listed is not None:
        return len(listed)
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
    # Only when NVML is missing (importing torch takes seconds), and never in this process: see TORCH_COUNT.
    counted = subprocess.run(
        [sys.executable, "-c", TORCH_COUNT], capture_output=True, text=True, timeout=300, check=False
    )
    lines = counted.stdout.split()
    return int(lines[-1]) if counted.returncode == 0 and lines and lines[-1].isdigit() else 0


def check_gpu(gpu: int, visible: int, *, numbered: str = SMI_NUMBERING) -> int:
    """`gpu` if this machine has it, else GpuChoiceError naming the ones it has (`numbered` says how)."""
    if visible == 0:
        raise GpuChoiceError(NO_GPU)
    if not 0 <= gpu < visible:
        have = "GPU 0" if visible == 1 else f"GPUs 0-{visible - 1}"
        raise GpuChoiceError(f"GPU {gpu} is not on this machine: it has {have} ({numbered})")
    return gpu


def parse_gpus(text: str, visible: int, *, numbered: str = SMI_NUMBERING) -> list[int]:
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
    return [check_gpu(gpu, visible, numbered=numbered) for gpu in chosen]


def gpu_worker_name(gpu: int) -> str:
    """The name of the worker of GPU `gpu`: its Celery node (`worker-gpu1@host`) and its log."""
    return f"worker-gpu{gpu}"


def worker_env(gpu: int | None, listed: Sequence[str] | None = None) -> dict[str, str]:
    """The environment that pins a worker to GPU `gpu` before CUDA starts (nothing for an unpinned one).

    CUDA numbers cards fastest first unless told PCI_BUS_ID; nvidia-smi and docker number them by bus.
    With `listed` (the user's CUDA_VISIBLE_DEVICES), `gpu` is a position in it, and the user's
    CUDA_DEVICE_ORDER, which gives the list its meaning, is kept.
    """
    if gpu is None:
        return {}
    if listed is not None:
        return {CUDA_VISIBLE_DEVICES: listed[gpu], WORKER_GPU: str(gpu)}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", CUDA_VISIBLE_DEVICES: str(gpu), WORKER_GPU: str(gpu)}


def worker_pinning(gpu: int | None, environ: Mapping[str, str], count: Callable[[], int]) -> dict[str, str]:
    """The environment that pins `nightrender worker` to its card (empty: nothing to pin).

    `--gpu N` pins to card N. WORKER_GPU=N without --gpu pins the same way where the machine shows several
    GPUs and CUDA_VISIBLE_DEVICES is unset (a bare host); in a container given one card (compose sets
    WORKER_GPU to its host index) or under the user's CUDA_VISIBLE_DEVICES, it only names the worker.
    `count()` is visible_gpu_count, asked only when needed. GpuChoiceError for a card that is not here,
    ValueError for a WORKER_GPU that is no index.
    """
    listed = listed_devices(environ)
    if gpu is None:
        gpu = pinned_gpu(environ)
        if gpu is None or listed is not None:
            return {}
        visible = count()
        if visible <= 1:
            return {}
    else:
        visible = count()
    check_gpu(gpu, visible, numbered=numbering(environ))
    return worker_env(gpu, listed)
