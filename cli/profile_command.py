"""`nightrender profile`: peak VRAM and seconds per image, per size and offload mode, on this machine."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli.common import Model, console, fail, settings
from cli.render_options import SIZES_GRAMMAR, Steps, parse_sizes


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return parse_sizes(text)
    except ValueError as error:
        fail(str(error))


def profile(
    budget: Annotated[str, typer.Option(help="VRAM budget in GB for the allocator cap, or auto")] = "auto",
    sizes: Annotated[str, typer.Option(help=f"Sizes to measure ({SIZES_GRAMMAR})")] = "512,768,1024",
    modes: Annotated[
        str, typer.Option(help="Offload modes to compare: auto,stream,none,model,sequential,group")
    ] = "auto,sequential",
    model: Model = None,
    steps: Steps = 9,
    images: Annotated[
        int, typer.Option(min=1, help="Timed images per size and mode, after one warm-up image")
    ] = 2,
    out: Annotated[Path, typer.Option(help="Folder for profile.json and the chart profile.png")] = Path(
        "profile"
    ),
) -> None:
    """Measure peak VRAM and seconds per image per size and mode; prints a table and writes a PNG chart."""
    from cli.profile_view import profile_chart, profile_table
    from worker.engine.loading import EngineError
    from worker.engine.profile import profile as run_profile

    config = settings()
    rows: list[dict] = []
    try:
        measured = run_profile(
            model or config.resolved_worker_model(),
            budget_gb=budget,
            sizes=_sizes(sizes),
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            cache_dir=config.resolved_model_cache_dir(),
            steps=steps,
            images=images,
            on_row=lambda row: console.print(
                f"  {row.mode} {row.width}x{row.height}: {row.plan or row.error}"
            ),
        )
    except (EngineError, ValueError) as error:
        fail(str(error))
    rows = [row.as_dict() for row in measured]
    console.print(profile_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2))
    chart = profile_chart(rows, out / "profile.png", rows[0]["budget_bytes"] if rows else None)
    console.print(f"chart: {chart.resolve()}  data: {(out / 'profile.json').resolve()}")


COMMANDS: tuple[Callable[..., None], ...] = (profile,)
