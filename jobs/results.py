"""Where a job's image is recorded and found: relative to OUTPUTS_DIR, resolved by each reader.

A worker on another machine writes to a shared volume that the API may mount at another path, so the
database holds the image's place inside OUTPUTS_DIR (posix form, e.g. `<batch id>/00003-7-a-fox-1a2b3c4d.png`)
and every reader joins it to its own OUTPUTS_DIR. Rows written before this held absolute paths: those
are used as they are. Either way, only a file that lies inside the reader's OUTPUTS_DIR is ever served.
"""

from __future__ import annotations

import os
from pathlib import Path


def stored_result_path(outputs_dir: Path, path: Path) -> str:
    """How the worker records an image it wrote under `outputs_dir`: relative, with `/` separators.

    Raises ValueError for a path outside `outputs_dir`: the writer never makes one, and a reader could
    not find it on another machine.
    """
    return path.relative_to(outputs_dir).as_posix()


def result_file(outputs_dir: Path, stored: str | None) -> Path | None:
    """The recorded image on this machine, if it lies inside `outputs_dir` and is a file still there.

    `outputs_dir` is resolved (Settings.resolved_outputs_dir()). A relative path is joined to it, an
    absolute one (an older row) is taken as it is; either is resolved, so `..` or a symlink that leads
    out of the folder is refused.
    """
    if not stored:
        return None
    path = (outputs_dir / stored).resolve()  # joining an absolute path gives that path
    return path if path.is_relative_to(outputs_dir) and path.is_file() else None


def result_location(outputs_dir: Path, stored: str) -> str | None:
    """The recorded image's path, normalised without touching the disk; None if it leaves `outputs_dir`.

    For sums over many files (an archive's size estimate), where `resolve()` costs ~10x the `stat`. It
    does not see symlinks: what is then read from the file must go through `result_file`.
    """
    base = os.fspath(outputs_dir)
    joined = os.path.normpath(os.path.join(base, stored))
    # commonpath, not a prefix test: an OUTPUTS_DIR of `/` made the prefix `//`, which matched nothing.
    return joined if joined != base and os.path.commonpath([base, joined]) == base else None
