"""The stack's logs as `nightrender logs` prints them: one process's, or each GPU worker's after up --gpus."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

GPU_WORKER_LOG = re.compile(r"worker-gpu(\d+)")  # the log of `up --gpus`'s worker of one GPU


def default_worker_logs(folder: Path) -> list[str]:
    """The worker logs `logs` shows when no process is named: the last run's.

    `worker` after a plain `up` or `run`; after `up --gpus`, every worker-gpu<N> log written since
    worker.log was (all of them when there is none), by GPU index. An older worker.log is a stale one.
    """
    single = folder / "worker.log"
    since = single.stat().st_mtime if single.exists() else float("-inf")
    newer = [path for path in _gpu_worker_logs(folder) if path.stat().st_mtime > since]
    return [path.stem for path in newer] or ["worker"]


def _gpu_worker_logs(folder: Path) -> list[Path]:
    """worker-gpu<N>.log files, by N (gpu10 after gpu2)."""
    indexed = []
    for path in folder.glob("worker-gpu*.log"):
        match = GPU_WORKER_LOG.fullmatch(path.stem)
        if match:
            indexed.append((int(match.group(1)), path))
    return [path for _, path in sorted(indexed)]


def print_logs(paths: list[Path], lines: int, *, out: Callable[[str], None], follow: bool) -> None:
    """The last `lines` of each log (under a `==> name <==` header when there are several, as tail does)."""
    streams = [path.open(errors="replace") for path in paths]
    try:
        for path, stream in zip(paths, streams, strict=True):
            if len(paths) > 1:
                out(f"==> {path.name} <==")
            for line in stream.readlines()[-lines:] if lines > 0 else []:
                out(line.rstrip("\n"))
        if follow:
            _follow(paths, streams, out)
    finally:
        for stream in streams:
            stream.close()


def _follow(paths: list[Path], streams: Sequence[TextIO], out: Callable[[str], None]) -> None:
    """Print new lines as they come, naming the log again whenever the lines switch to another."""
    shown: Path | None = paths[-1] if len(paths) > 1 else None
    while True:
        quiet = True
        for path, stream in zip(paths, streams, strict=True):
            line = stream.readline()
            while line:
                if len(paths) > 1 and shown != path:
                    out(f"==> {path.name} <==")
                    shown = path
                out(line.rstrip("\n"))
                quiet, line = False, stream.readline()
        if quiet:
            time.sleep(0.3)
