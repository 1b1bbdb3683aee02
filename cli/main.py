"""`nightrender`: run the embedded stack, submit prompt batches, follow them and download the images."""

from __future__ import annotations

import typer

from cli import batch_commands, profile_command, stack_commands
from cli.keys import keys_app

app = typer.Typer(
    help="A render queue for text-to-image models that works within a VRAM budget.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

# Each module lists its commands, in the order `--help` shows them.
for module in (stack_commands, batch_commands, profile_command):
    for command in module.COMMANDS:
        app.command()(command)


if __name__ == "__main__":
    app()
