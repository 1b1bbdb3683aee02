"""`nightrender keys`: issue, list and revoke API keys, straight in the database the API reads."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import KeyCommandError, add_key, list_keys, revoke_key
from jobs.settings import get_settings

keys_app = typer.Typer(help="API keys: once one exists, every request needs one (Authorization: Bearer).")
console = Console()


def _factory() -> sessionmaker[Session]:
    return make_session_factory(make_database(get_settings().resolved_database_url()))


@keys_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="who the key is for, e.g. alice or dashboard")],
    admin: Annotated[
        bool, typer.Option(help="may also pause and resume the queue and read /metrics")
    ] = False,
) -> None:
    """Create a key and print it once; only its hash is stored."""
    try:
        with transaction(_factory()) as session:
            key = add_key(session, name=name, admin=admin)
    except KeyCommandError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None
    console.print(f"key {name!r}{' (admin)' if admin else ''} created. It is shown only now; keep it:")
    print(key)
    console.print("Send it as 'Authorization: Bearer <key>', or set API_KEY for this CLI.")


@keys_app.command("list")
def list_() -> None:
    """Every key's name, role and state (never the key itself)."""
    with _factory()() as session:
        keys = list_keys(session)
    if not keys:
        console.print("no keys: the API serves only loopback clients, with no key")
        return
    table = Table("name", "role", "created", "state")
    for info in keys:
        state = f"revoked {info.revoked_at:%Y-%m-%d %H:%M}" if info.revoked_at else "active"
        table.add_row(
            info.name, "admin" if info.admin else "user", f"{info.created_at:%Y-%m-%d %H:%M}", state
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(name: Annotated[str, typer.Argument(help="the key's name")]) -> None:
    """Revoke a key; the API refuses it within API_KEY_CACHE_S seconds."""
    try:
        with transaction(_factory()) as session:
            revoke_key(session, name=name)
    except KeyCommandError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from None
    console.print(f"key {name!r} revoked")
