"""What every CLI command shares: the console, the settings, the error exit and the option types."""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console

from jobs.settings import Settings, get_settings

console = Console()

Model = Annotated[str | None, typer.Option(help="Model to render with (default: the worker's)")]
Size = Annotated[int, typer.Option(help="Pixels; a multiple of 16")]


def settings() -> Settings:
    """The settings, as the global options (--host, --port, --api-url) left them."""
    return get_settings()


def fail(message: str) -> NoReturn:
    """Print the reason and exit 2, as every CLI error does."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)
