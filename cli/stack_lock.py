"""One stack per data directory: a lock file held while a stack runs, and a record of its processes.

The lock (py-filelock: flock on Unix, msvcrt on Windows) is released by the OS when its holder dies, so
a crashed `up` never blocks the next one. The record names the holder and its children, so `stop`
knows whom to signal, and the next `up` can stop what a killed stack left running.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from filelock import FileLock, Timeout


class StackLocked(RuntimeError):
    """Another stack runs from this data directory."""


@dataclass
class StackRecord:
    """Who holds the lock: its pid, its API's address and its child processes (pid and start time)."""

    pid: int
    api_url: str
    children: dict[str, tuple[int, float]] = field(default_factory=dict)


class StackLock:
    """The data directory's stack lock and record."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self._lock = FileLock(self.data_dir / "stack.lock")
        self.record_path = self.data_dir / "stack.json"
        self.record: StackRecord | None = None

    def acquire(self, api_url: str) -> list[str]:
        """Take the lock (StackLocked if held) and stop what a dead stack left; returns what was stopped."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise StackLocked(self._held_message()) from None
        stopped = stop_leftovers(self.read())
        self.record = StackRecord(pid=os.getpid(), api_url=api_url)
        self._write()
        return stopped

    def add_child(self, name: str, pid: int) -> None:
        """Remember a process this stack started."""
        if self.record is not None:
            self.record.children[name] = (pid, psutil.Process(pid).create_time())
            self._write()

    def release(self) -> None:
        """The stack has stopped: forget it and free the lock."""
        if self.record is not None:
            self.record_path.unlink(missing_ok=True)
            self.record = None
            self._lock.release()

    def stop_dead_holders_processes(self) -> list[str]:
        """With the lock free, stop what a killed stack left running (its record says); returns those."""
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return []
        try:
            stopped = stop_leftovers(self.read())
            self.record_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
        return stopped

    def running(self) -> StackRecord | None:
        """The record of the stack that holds the lock now, or None if none does."""
        if self.record is not None:
            return self.record
        probe = FileLock(self._lock.lock_file)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return self.read() or StackRecord(pid=0, api_url="?")
        probe.release()
        return None

    def read(self) -> StackRecord | None:
        """The record on disk, whoever wrote it (None if there is none or it is unreadable)."""
        try:
            raw = json.loads(self.record_path.read_text())
            children = {name: (int(pid), float(at)) for name, (pid, at) in raw.get("children", {}).items()}
            return StackRecord(pid=int(raw["pid"]), api_url=str(raw["api_url"]), children=children)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write(self) -> None:
        temporary = self.record_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self.record) if self.record else {}))
        os.replace(temporary, self.record_path)

    def _held_message(self) -> str:
        record = self.read()
        who = f" (pid {record.pid}, API at {record.api_url})" if record else ""
        return (
            f"a nightrender stack is already running from {self.data_dir}{who}. Use it, stop it with "
            "`nightrender stop`, or give this one another DATA_DIR (--data-dir)."
        )


def stop_leftovers(record: StackRecord | None, timeout: float = 15.0) -> list[str]:
    """Stop the children of a stack that died without stopping them (the same pid and start time only)."""
    alive = {name: process for name, (pid, at) in (record.children if record else {}).items()
             if (process := _same_process(pid, at)) is not None}  # fmt: skip
    for process in alive.values():
        process.send_signal(signal.SIGTERM)
    _, still = psutil.wait_procs(list(alive.values()), timeout=timeout)
    for process in still:
        process.kill()
    psutil.wait_procs(still, timeout=5)
    return [f"{name} (pid {process.pid})" for name, process in alive.items()]


def _same_process(pid: int, started_at: float) -> psutil.Process | None:
    # A pid alone may have been reused by an unrelated program since; its start time tells them apart.
    try:
        process = psutil.Process(pid)
        # Start times are derived from the boot time, which moves by whole seconds after a clock step.
        return process if abs(process.create_time() - started_at) < 2.0 else None
    except psutil.Error:
        return None


def wait_until_released(lock: StackLock, timeout: float) -> bool:
    """Whether the stack holding `lock` let it go within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.running() is None:
            return True
        time.sleep(0.2)
    return False
