"""What every CLI command shares: the console, the settings, the error exit and the option types."""

from __future__ import annotations

import os
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from jobs.settings import Settings, get_settings

console = Console()

Model = Annotated[str | None, typer.Option(help="Model to render with (default: the worker's)")]
Size = Annotated[int, typer.Option(help="Pixels; a multiple of 16")]


def _budget(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    try:
        gigabytes = float(value)
    except ValueError:
        gigabytes = 0.0
    if not 0 < gigabytes < 10_000:
        raise typer.BadParameter(f"give GB of VRAM (e.g. 12 or 7.5) or auto, not {value!r}")
    return value


Budget = Annotated[
    str | None,
    typer.Option(
        help="VRAM budget in GB for the worker this starts (e.g. 12), or auto (the card's free memory)",
        callback=_budget,
    ),
]


def settings() -> Settings:
    """The settings, as the global options (--host, --port, --api-url) left them."""
    return get_settings()


def fail(message: str) -> NoReturn:
    """Print the reason and exit 2, as every CLI error does."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


Gpus = Annotated[
    str | None,
    typer.Option(
        help="One worker per GPU: all, or indices as nvidia-smi numbers them (0,1), or positions in "
        "CUDA_VISIBLE_DEVICES when it is set; each gets its own budget; one that dies leaves the others "
        "running"
    ),
]


def chosen_gpus(gpus: str | None) -> list[int] | None:
    """The GPUs `--gpus` names, checked against this machine's before anything starts (None without it)."""
    from cli.gpus import GpuChoiceError, numbering, parse_gpus, visible_gpu_count

    if gpus is None:
        return None
    try:
        return parse_gpus(gpus, visible_gpu_count(), numbered=numbering(os.environ))
    except GpuChoiceError as error:
        fail(str(error))
