"""`--gpus` and `--gpu` read against the GPUs a machine has, and the environment that pins a worker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.gpus import (
    NO_GPU,
    GpuChoiceError,
    check_gpu,
    gpu_worker_name,
    listed_devices,
    numbering,
    parse_gpus,
    visible_gpu_count,
    worker_env,
    worker_pinning,
)
from cli.process_commands import worker_command
from jobs.presence import pinned_gpu
from jobs.queue import model_queue
from jobs.settings import Settings


@pytest.mark.parametrize(
    ("text", "visible", "chosen"),
    [("all", 2, [0, 1]), ("ALL", 4, [0, 1, 2, 3]), ("0,1", 2, [0, 1]), (" 1 ", 2, [1]), ("3,1", 4, [3, 1])],
)
def test_gpus_names_all_or_the_listed_cards(text: str, visible: int, chosen: list[int]) -> None:
    assert parse_gpus(text, visible) == chosen


@pytest.mark.parametrize(
    ("text", "visible", "message"),
    [
        ("0,x", 2, "--gpus takes all or GPU indices such as 0,1, not '0,x'"),
        ("", 2, "--gpus takes all or GPU indices such as 0,1, not ''"),
        ("0,,1", 2, "--gpus takes all or GPU indices such as 0,1"),
        ("-1", 2, "--gpus takes all or GPU indices such as 0,1"),
        ("0,1,0", 2, "--gpus names GPU 0 twice: one worker per GPU"),
        ("2", 2, "GPU 2 is not on this machine: it has GPUs 0-1 (as nvidia-smi numbers them)"),
        ("0,1", 1, "GPU 1 is not on this machine: it has GPU 0"),
        ("all", 0, NO_GPU),
        ("0,1", 0, NO_GPU),
    ],
)
def test_gpus_that_name_no_card_of_this_machine_are_refused(text: str, visible: int, message: str) -> None:
    with pytest.raises(GpuChoiceError) as refused:
        parse_gpus(text, visible)
    assert str(refused.value).startswith(message)


def test_one_gpu_is_checked_the_same_way() -> None:
    assert check_gpu(1, 2) == 1
    with pytest.raises(GpuChoiceError, match="GPU 2 is not on this machine"):
        check_gpu(2, 2)
    with pytest.raises(GpuChoiceError, match="no GPU found on this machine"):
        check_gpu(0, 0)


def test_a_pinned_worker_sees_only_its_card_numbered_as_nvidia_smi_does() -> None:
    assert worker_env(1) == {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1",
        "WORKER_GPU": "1",
    }
    assert worker_env(None) == {}
    assert (
        pinned_gpu(worker_env(3)) == 3 and pinned_gpu({}) is None and pinned_gpu({"WORKER_GPU": ""}) is None
    )
    with pytest.raises(ValueError, match="WORKER_GPU must be a GPU index"):
        pinned_gpu({"WORKER_GPU": "cuda:1"})


def test_a_gpu_workers_command_names_it_and_consumes_its_models_queue() -> None:
    settings = Settings(queue_name="q", worker_model="synthetic:tiny")
    command = worker_command(settings, gpu=1)
    node = command[command.index("--hostname") + 1]
    assert node == f"{gpu_worker_name(1)}@%h" == "worker-gpu1@%h"
    assert command[command.index("--queues") + 1] == model_queue("q", "synthetic:tiny")
    unpinned = worker_command(settings)
    assert "--hostname" not in unpinned and unpinned[unpinned.index("--queues") + 1] == model_queue(
        "q", "synthetic:tiny"
    )
    named = worker_command(settings, "w0", gpu=1)
    assert named[named.index("--hostname") + 1] == "w0@%h"


# The user's CUDA_VISIBLE_DEVICES: --gpu(s) count positions in its list


@pytest.mark.parametrize(
    ("value", "listed"),
    [
        ("2,3", ["2", "3"]),
        (" 1 ", ["1"]),
        ("GPU-8d1c,GPU-77aa", ["GPU-8d1c", "GPU-77aa"]),
        ("", []),
        ("-1", []),  # CUDA stops at the first entry that is no device: this hides every card
        ("0,-1,2", ["0"]),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value: str, listed: list[str]) -> None:
    environ = {"CUDA_VISIBLE_DEVICES": value}
    assert listed_devices(environ) == listed
    assert visible_gpu_count(environ) == len(listed)  # the machine's cards are not counted then
    assert listed_devices({}) is None


def test_gpus_under_the_users_list_pin_to_the_card_at_that_position() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "FASTEST_FIRST"}
    listed = listed_devices(environ)
    assert parse_gpus("all", visible_gpu_count(environ)) == [0, 1]
    # Card 3, named worker-gpu1; the user's CUDA_DEVICE_ORDER (which gives "3" its meaning) is left alone.
    assert worker_env(1, listed) == {"CUDA_VISIBLE_DEVICES": "3", "WORKER_GPU": "1"}
    assert worker_pinning(1, environ, lambda: visible_gpu_count(environ)) == worker_env(1, listed)
    with pytest.raises(GpuChoiceError) as refused:
        parse_gpus("0,2", visible_gpu_count(environ), numbered=numbering(environ))
    assert str(refused.value) == (
        "GPU 2 is not on this machine: it has GPUs 0-1 (positions in CUDA_VISIBLE_DEVICES=2,3)"
    )


def machine_with(cards: int) -> Callable[[], int]:
    """The count a machine with `cards` GPUs gives (this machine has none to count)."""
    return lambda: cards


@pytest.mark.parametrize(
    ("environ", "cards", "pinning"),
    [
        # WORKER_GPU on a bare host with several cards pins as --gpu would: label and card agree.
        ({"WORKER_GPU": "1"}, 2, worker_env(1)),
        # In a container given its one card (compose), or on the CPU, WORKER_GPU only names the worker.
        ({"WORKER_GPU": "1"}, 1, {}),
        ({"WORKER_GPU": "1"}, 0, {}),
        # The user's own CUDA_VISIBLE_DEVICES already chose the card.
        ({"WORKER_GPU": "1", "CUDA_VISIBLE_DEVICES": "1"}, 2, {}),
        ({}, 2, {}),
    ],
)
def test_worker_gpu_without_the_flag_pins_only_where_several_cards_show(
    environ: dict[str, str], cards: int, pinning: dict[str, str]
) -> None:
    assert worker_pinning(None, environ, machine_with(cards)) == pinning


def test_a_worker_gpu_or_flag_naming_a_missing_card_is_refused() -> None:
    with pytest.raises(GpuChoiceError, match="GPU 2 is not on this machine: it has GPUs 0-1"):
        worker_pinning(None, {"WORKER_GPU": "2"}, machine_with(2))
    with pytest.raises(GpuChoiceError, match="GPU 3 is not on this machine"):
        worker_pinning(3, {}, machine_with(2))
    with pytest.raises(ValueError, match="WORKER_GPU must be a GPU index"):
        worker_pinning(None, {"WORKER_GPU": "cuda:1"}, machine_with(2))
    assert worker_pinning(0, {"WORKER_GPU": "1"}, machine_with(2)) == worker_env(0)  # --gpu wins


COUNT_IN_A_FRESH_PROCESS = """
import os, sys
os.environ.pop("CUDA_VISIBLE_DEVICES", None)
from cli.gpus import visible_gpu_count
visible_gpu_count()
print("torch" in sys.modules)
"""


def test_counting_the_gpus_never_starts_cuda_in_the_cli_process() -> None:
    """Without NVML the count is torch's, taken in a child: `worker --gpu N` must pin itself after it."""
    result = subprocess.run(
        [sys.executable, "-c", COUNT_IN_A_FRESH_PROCESS],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert result.stdout.split()[-1] == "False"
