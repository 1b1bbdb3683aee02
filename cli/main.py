"""`nightrender`: run the embedded stack, submit prompt batches, follow them and download the images."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cli.client import ApiError, Client
from cli.keys import keys_app
from cli.render_views import WorkerGone, follow_batch, memory_table
from cli.signals import interrupt_on_termination, shielded
from jobs.settings import Settings, get_settings

app = typer.Typer(
    help="A render queue for text-to-image models that works within a VRAM budget.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
console = Console()

Model = Annotated[str | None, typer.Option(help="Model to render with (default: the worker's)")]
Size = Annotated[int, typer.Option(help="Pixels; a multiple of 16")]


def _settings() -> Settings:
    return get_settings()


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


@app.command()
def up(model: Model = None) -> None:
    """Start the embedded default: SQLite, an embedded Redis, the migrations, the API and one worker."""
    from cli.stack import Stack, StackError

    stack = Stack(_settings(), extra_env={"WORKER_MODEL": model} if model else None)
    failure = None
    try:
        with interrupt_on_termination():
            try:
                stack.start()
            except StackError as error:
                failure = str(error)
            else:
                console.print(
                    f"nightrender is up at {stack.settings.resolved_api_url()} (docs at /docs). "
                    "Ctrl-C stops it."
                )
                while all(p.poll() is None for p in stack.processes.values()):
                    time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        with shielded():
            stack.stop()
    if failure:
        _fail(failure)


@app.command()
def api() -> None:
    """Run only the HTTP API (uvicorn), in the foreground."""
    from cli.stack import api_command, shared_metrics_env

    settings = _settings()
    os.environ.update(shared_metrics_env(settings))
    command = api_command(settings)
    os.execv(command[0], command)


@app.command()
def worker() -> None:
    """Run one Celery worker for this machine's GPU, in the foreground."""
    from cli.stack import worker_command
    from worker.engine.loading import EngineError, check_device_for, pick_device

    settings = _settings()
    try:
        check_device_for(settings.resolved_worker_model(), pick_device())
    except EngineError as error:
        _fail(str(error))
    command = worker_command(settings)
    os.execv(command[0], command)


@app.command()
def migrate(revision: str = "head", downgrade: bool = False) -> None:
    """Apply the Alembic migrations (or downgrade to REVISION with --downgrade)."""
    from jobs import migrate as migrations

    url = _settings().resolved_database_url()
    if downgrade:
        migrations.downgrade(url, "base" if revision == "head" else revision)
    else:
        migrations.upgrade(url, revision)
    console.print(f"schema at {'base' if downgrade and revision == 'head' else revision} on {url}")


def _batch_fields(
    model: str | None,
    width: int,
    height: int,
    steps: int,
    seed: int | None,
    sizes: str | None,
    seeds: str | None,
) -> dict[str, str]:
    fields = {"width": str(width), "height": str(height), "steps": str(steps)}
    optional = {"model": model, "seed": None if seed is None else str(seed), "sizes": sizes, "seeds": seeds}
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


@app.command()
def submit(
    prompts_file: Path,
    model: Model = None,
    width: Size = 1024,
    height: Size = 1024,
    steps: int = 9,
    seed: int | None = None,
    sizes: Annotated[
        str | None, typer.Option(help="e.g. 512x512,768x512 (a matrix with the prompts)")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="e.g. 1,2,3 (a matrix with the prompts)")] = None,
) -> None:
    """Submit a .txt, .csv or .jsonl prompt file as a batch; prints the batch id."""
    client = Client.for_settings(_settings())
    try:
        created = client.submit_file(
            prompts_file, _batch_fields(model, width, height, steps, seed, sizes, seeds)
        )
    except ApiError as error:
        _fail(str(error))
    console.print(f"batch {created['id']}: {len(created['job_ids'])} jobs queued")


@app.command()
def status(batch_id: str, watch: bool = False) -> None:
    """Show a batch's progress (live with --watch)."""
    client = Client.for_settings(_settings())
    try:
        summary = follow_batch(client, batch_id, console) if watch else client.batch(batch_id)
    except ApiError as error:
        _fail(str(error))
    console.print_json(json.dumps(summary))


def _action(path: str) -> None:
    try:
        console.print_json(json.dumps(Client.for_settings(_settings()).post(path)))
    except ApiError as error:
        _fail(str(error))


@app.command()
def cancel(batch_id: Annotated[str | None, typer.Argument()] = None, job: str | None = None) -> None:
    """Cancel a batch (or one --job): queued jobs stop at once, running ones at their next step."""
    _action(f"/v1/jobs/{job}/cancel" if job else f"/v1/batches/{_required(batch_id)}/cancel")


@app.command()
def retry(batch_id: Annotated[str | None, typer.Argument()] = None, job: str | None = None) -> None:
    """Queue again the failed or cancelled jobs of a batch (or one --job), linked to the originals."""
    _action(f"/v1/jobs/{job}/retry" if job else f"/v1/batches/{_required(batch_id)}/retry")


@app.command()
def pause() -> None:
    """Pause the queue: workers finish their current job and take no more."""
    _action("/v1/queue/pause")


@app.command()
def resume() -> None:
    """Resume the queue; jobs handed back while paused are published again."""
    _action("/v1/queue/resume")


def _required(batch_id: str | None) -> str:
    if not batch_id:
        _fail("give a BATCH_ID or --job JOB_ID")
    return str(batch_id)


@app.command()
def download(batch_id: str, out: Path = Path("renders")) -> None:
    """Download a batch's images and manifest into OUT/BATCH_ID and print the memory table."""
    _download(Client.for_settings(_settings()), batch_id, out)


def _download(client: Client, batch_id: str, out: Path) -> Path:
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    target = out / batch_id
    with Progress(
        *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as bar:
        task = bar.add_task("downloading", total=None)
        try:
            manifest = client.download_archive(batch_id, target, lambda n: bar.advance(task, n))
        except ApiError as error:
            _fail(str(error))
    jobs = json.loads(manifest.read_text())["jobs"]
    console.print(memory_table(jobs))
    images = sum(1 for job in jobs if job.get("file"))
    console.print(f"{images} of {len(jobs)} images are in {target.resolve()}")
    return target


@app.command()
def run(
    prompts_file: Path,
    out: Path = Path("renders"),
    model: Model = None,
    width: Size = 1024,
    height: Size = 1024,
    steps: int = 9,
    seed: int | None = None,
    sizes: Annotated[str | None, typer.Option(help="e.g. 512x512,768x512")] = None,
    seeds: Annotated[str | None, typer.Option(help="e.g. 1,2,3")] = None,
) -> None:
    """The main job: start (or attach to) the stack, submit, show progress, download, print memory."""
    from cli.stack import Stack, StackError

    if not prompts_file.is_file():
        _fail(f"no prompts file at {prompts_file}")
    settings = _settings()
    client = Client.for_settings(settings)
    stack = None
    # SIGTERM and SIGHUP stop what this command started, like Ctrl-C; the stop itself is not interrupted.
    with interrupt_on_termination():
        try:
            if not client.healthy():
                console.print("starting the embedded stack (SQLite + embedded Redis + API + worker)...")
                stack = Stack(settings, extra_env={"WORKER_MODEL": model} if model else None)
                stack.start()
            fields = _batch_fields(model, width, height, steps, seed, sizes, seeds)
            created = client.submit_file(prompts_file, fields)
            console.print(f"batch {created['id']}: {len(created['job_ids'])} jobs queued")
            alive = stack.worker_alive if stack is not None else None
            summary = follow_batch(client, created["id"], console, worker_alive=alive)
            _download(client, created["id"], out)
            if summary["counts"]["failed"]:
                _fail(f"{summary['counts']['failed']} jobs failed; see `nightrender status {created['id']}`")
        except (ApiError, WorkerGone, StackError) as error:
            _fail(str(error))
        finally:
            if stack is not None:
                with shielded():
                    stack.stop()


def _sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        width, _, height = part.strip().lower().partition("x")
        if not width.isdigit() or (height and not height.isdigit()):
            _fail(f"sizes must look like 512,768 or 1024x768, got {part!r}")
        sizes.append((int(width), int(height or width)))
    return sizes


@app.command()
def profile(
    budget: Annotated[str, typer.Option(help="GB for the allocator cap, or auto")] = "auto",
    sizes: Annotated[str, typer.Option(help="e.g. 512,768,1024 or 1024x768")] = "512,768,1024",
    modes: Annotated[str, typer.Option(help="auto,stream,none,model,sequential,group")] = "auto,sequential",
    model: Model = None,
    steps: int = 9,
    images: int = 2,
    out: Path = Path("profile"),
) -> None:
    """Measure peak VRAM and seconds per image per size and mode; prints a table and writes a PNG chart."""
    from cli.profile_view import profile_chart, profile_table
    from worker.engine.loading import EngineError
    from worker.engine.profile import profile as run_profile

    settings = _settings()
    rows: list[dict] = []
    try:
        measured = run_profile(
            model or settings.resolved_worker_model(),
            budget_gb=budget,
            sizes=_sizes(sizes),
            modes=[m.strip() for m in modes.split(",") if m.strip()],
            cache_dir=settings.model_cache_dir,
            steps=steps,
            images=images,
            on_row=lambda row: console.print(
                f"  {row.mode} {row.width}x{row.height}: {row.plan or row.error}"
            ),
        )
    except (EngineError, ValueError) as error:
        _fail(str(error))
    rows = [row.as_dict() for row in measured]
    console.print(profile_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(rows, indent=2))
    chart = profile_chart(rows, out / "profile.png", rows[0]["budget_bytes"] if rows else None)
    console.print(f"chart: {chart.resolve()}  data: {(out / 'profile.json').resolve()}")


if __name__ == "__main__":
    app()
