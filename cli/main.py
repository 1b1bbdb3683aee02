"""`nightrender`: run the embedded stack, submit prompt batches, follow them and download the images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cli import batch_commands, profile_command, stack_commands
from cli.keys import keys_app
from jobs.settings import get_settings

app = typer.Typer(
    help="A render queue for text-to-image models that works within a VRAM budget.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

# Each module lists its commands, in the order `--help` shows them.
for module in (stack_commands, batch_commands, profile_command):
    for command in module.COMMANDS:
        app.command()(command)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"nightrender {stack_commands.package_version()}")
        raise typer.Exit()


Host = Annotated[str | None, typer.Option(help="Address the API listens on and the CLI calls (API_HOST)")]
Port = Annotated[int | None, typer.Option(min=1, max=65535, help="The API's port (API_PORT)")]
ApiUrl = Annotated[str | None, typer.Option(help="A running API to use, e.g. http://gpu-box:8000 (API_URL)")]
DataDir = Annotated[Path | None, typer.Option(help="Folder of the database, logs and images (DATA_DIR)")]
Version = Annotated[
    bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit")
]


@app.callback()
def main(
    host: Host = None,
    port: Port = None,
    api_url: ApiUrl = None,
    data_dir: DataDir = None,
    version: Version = False,
) -> None:
    """Global options override the environment (and .env) for this command and what it starts."""
    chosen = {"API_HOST": host, "API_PORT": port, "API_URL": api_url, "DATA_DIR": data_dir}
    # The settings are read from the environment, and the processes a stack starts inherit it.
    os.environ.update({name: str(value) for name, value in chosen.items() if value is not None})
    get_settings.cache_clear()


if __name__ == "__main__":
    app()
