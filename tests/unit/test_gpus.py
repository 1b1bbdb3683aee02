"""`--gpus` and `--gpu` read against the GPUs a machine has, and the environment that pins a worker."""

from __future__ import annotations

import pytest

from cli.gpus import NO_GPU, GpuChoiceError, check_gpu, gpu_worker_name, parse_gpus, worker_env
from cli.stack import worker_command
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
