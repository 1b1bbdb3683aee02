"""What `up` does when a process of its stack exits while it runs.

A worker that dies while another worker still runs is said in one line and outlived: the others go on, and
the reconciler requeues the dead one's running job once its heartbeat is HEARTBEAT_STALE_S old. The stack
ends (and `up` stops the rest and exits non-zero) when the API or Redis exits, or when no worker is left.
`up` does not restart a dead worker: see ExitWatch.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence


class ExitWatch:
    """Reads the stack's processes on each check; remembers which dead workers it has already reported.

    No restart: a worker dies of what would likely kill it again (out of memory, a driver fault, a bad model
    file), each start reloads its model for minutes, and its jobs already go to the others. A supervisor that
    restarts (compose's `restart:`, systemd) is the place for that; `up` says which worker to look at.
    """

    def __init__(
        self, processes: Mapping[str, subprocess.Popen[bytes]], workers: Sequence[str], stale_s: float
    ) -> None:
        self._processes = processes
        self._workers = list(workers)
        self._stale_s = stale_s
        self._reported: set[str] = set()

    def check(self, say: Callable[[str], None]) -> str | None:
        """Why the stack must end (None while it goes on); `say` gets one line per worker lost meanwhile."""
        for name, process in self._processes.items():
            if name not in self._workers and process.poll() is not None:
                return _exited(name, process)
        dead = [name for name in self._workers if self._processes[name].poll() is not None]
        if len(dead) == len(self._workers):
            return self._all_gone(dead)
        for name in dead:
            if name not in self._reported:
                self._reported.add(name)
                say(self._outlived(name))
        return None

    def _outlived(self, name: str) -> str:
        code = self._processes[name].returncode
        return (
            f"{name} exited with {code}; the other workers go on, and its jobs are requeued after "
            f"HEARTBEAT_STALE_S ({self._stale_s:.0f}s); see `nightrender logs {name}`"
        )

    def _all_gone(self, dead: list[str]) -> str:
        if len(dead) == 1:
            return _exited(dead[0], self._processes[dead[0]])
        codes = ", ".join(f"{name} with {self._processes[name].returncode}" for name in dead)
        last = next((name for name in dead if name not in self._reported), dead[0])  # the one that ends it
        return f"every worker exited ({codes}); see `nightrender logs {last}`"


def _exited(name: str, process: subprocess.Popen[bytes]) -> str:
    return f"the {name} exited with {process.returncode}; see `nightrender logs {name}`"
