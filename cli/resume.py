"""What makes `run` resumable: one batch per prompt file and options, and the command that resumes it.

The API keeps an Idempotency-Key per owner: a second request with a key it has seen returns the batch the
first one made (`jobs/submit.py`). `run` derives its key from the prompt file's bytes and the normalized
options, so running the same command again attaches to that batch instead of queueing every prompt again.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import sys
from pathlib import Path

NEW_FLAG = "--new"
NONCE_OPTION = "--nonce"


def run_key(content: bytes, suffix: str, fields: dict[str, str], nonce: str | None) -> str:
    """The Idempotency-Key of a run: SHA-256 of the file's bytes, its type, the options and any nonce."""
    # The suffix picks the parser (.txt, .csv, .jsonl): the same bytes under another type are other prompts.
    options = json.dumps(
        {"suffix": suffix.lower(), "fields": fields, "nonce": nonce}, sort_keys=True, separators=(",", ":")
    )
    digest = hashlib.sha256(hashlib.sha256(content).digest() + options.encode())
    return f"nightrender-run-{digest.hexdigest()}"


def resume_command(argv: list[str], nonce: str | None) -> str:
    """The command line that attaches to the same batch: this one, with `--new` replaced by its nonce."""
    arguments: list[str] = []
    for argument in argv[1:]:
        arguments += [NONCE_OPTION, nonce] if argument == NEW_FLAG and nonce else [argument]
    return shlex.join([*program(argv[0]), *arguments])


def program(argv0: str) -> list[str]:
    """How this CLI was started: `nightrender` when that is what PATH finds, else python -m or the path."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in ("__main__", "") and Path(argv0).suffix == ".py":
        return [sys.executable, "-m", spec.name.removesuffix(".__main__")]
    found = shutil.which(Path(argv0).name)
    if found is not None and Path(found).resolve() == Path(argv0).resolve():
        return [Path(argv0).name]
    return [argv0]
