"""Which worker logs `nightrender logs` shows unnamed, and how several are printed (real files)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cli.stack_logs import default_worker_logs, print_logs


def log(folder: Path, name: str, text: str, age_s: float) -> Path:
    """A log written `age_s` seconds ago."""
    path = folder / f"{name}.log"
    path.write_text(text)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_a_plain_stack_shows_its_worker_log(tmp_path: Path) -> None:
    assert default_worker_logs(tmp_path) == ["worker"]  # none yet: `logs` says there is no log
    log(tmp_path, "worker", "celery@host ready.\n", age_s=10)
    log(tmp_path, "worker-gpu0", "from an older up --gpus\n", age_s=3600)
    assert default_worker_logs(tmp_path) == ["worker"]


def test_after_up_gpus_every_gpu_workers_log_is_shown_not_a_stale_worker_log(tmp_path: Path) -> None:
    log(tmp_path, "worker", "from an older plain up\n", age_s=3600)
    for gpu in (10, 2, 0):
        log(tmp_path, f"worker-gpu{gpu}", f"gpu {gpu}\n", age_s=10)
    (tmp_path / "worker-gpu1.log.1").write_text("the run before's, as spawn keeps it\n")
    (tmp_path / "worker-gpux.log").write_text("no GPU worker's\n")
    assert default_worker_logs(tmp_path) == ["worker-gpu0", "worker-gpu2", "worker-gpu10"]
    (tmp_path / "worker.log").unlink()
    assert default_worker_logs(tmp_path) == ["worker-gpu0", "worker-gpu2", "worker-gpu10"]


def test_several_logs_are_printed_each_under_its_name_as_tail_does(tmp_path: Path) -> None:
    paths = [log(tmp_path, f"worker-gpu{gpu}", f"a{gpu}\nb{gpu}\nc{gpu}\n", age_s=1) for gpu in (0, 1)]
    printed: list[str] = []
    print_logs(paths, 2, out=printed.append, follow=False)
    assert printed == ["==> worker-gpu0.log <==", "b0", "c0", "==> worker-gpu1.log <==", "b1", "c1"]
    alone: list[str] = []
    print_logs(paths[:1], 5, out=alone.append, follow=False)
    assert alone == ["a0", "b0", "c0"]
