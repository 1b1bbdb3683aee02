"""Commands about batches and jobs: submit, run, status, cancel, retry, pause, resume and download."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli.client import ApiError, Client
from cli.common import Model, Size, console, fail, settings
from cli.render_views import WorkerGone, follow_batch, memory_table
from cli.signals import interrupt_on_termination, shielded


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
    client = Client.for_settings(settings())
    try:
        created = client.submit_file(
            prompts_file, _batch_fields(model, width, height, steps, seed, sizes, seeds)
        )
    except ApiError as error:
        fail(str(error))
    console.print(f"batch {created['id']}: {len(created['job_ids'])} jobs queued")


def status(batch_id: str, watch: bool = False) -> None:
    """Show a batch's progress (live with --watch)."""
    client = Client.for_settings(settings())
    try:
        summary = follow_batch(client, batch_id, console) if watch else client.batch(batch_id)
    except ApiError as error:
        fail(str(error))
    console.print_json(json.dumps(summary))


def _action(path: str) -> None:
    try:
        console.print_json(json.dumps(Client.for_settings(settings()).post(path)))
    except ApiError as error:
        fail(str(error))


def cancel(batch_id: Annotated[str | None, typer.Argument()] = None, job: str | None = None) -> None:
    """Cancel a batch (or one --job): queued jobs stop at once, running ones at their next step."""
    _action(f"/v1/jobs/{job}/cancel" if job else f"/v1/batches/{_required(batch_id)}/cancel")


def retry(batch_id: Annotated[str | None, typer.Argument()] = None, job: str | None = None) -> None:
    """Queue again the failed or cancelled jobs of a batch (or one --job), linked to the originals."""
    _action(f"/v1/jobs/{job}/retry" if job else f"/v1/batches/{_required(batch_id)}/retry")


def pause() -> None:
    """Pause the queue: workers finish their current job and take no more."""
    _action("/v1/queue/pause")


def resume() -> None:
    """Resume the queue; jobs handed back while paused are published again."""
    _action("/v1/queue/resume")


def _required(batch_id: str | None) -> str:
    if not batch_id:
        fail("give a BATCH_ID or --job JOB_ID")
    return str(batch_id)


def download(batch_id: str, out: Path = Path("renders")) -> None:
    """Download a batch's images and manifest into OUT/BATCH_ID and print the memory table."""
    _download(Client.for_settings(settings()), batch_id, out)


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
            fail(str(error))
    jobs = json.loads(manifest.read_text())["jobs"]
    console.print(memory_table(jobs))
    images = sum(1 for job in jobs if job.get("file"))
    console.print(f"{images} of {len(jobs)} images are in {target.resolve()}")
    return target


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
        fail(f"no prompts file at {prompts_file}")
    config = settings()
    client = Client.for_settings(config)
    stack = None
    # SIGTERM and SIGHUP stop what this command started, like Ctrl-C; the stop itself is not interrupted.
    with interrupt_on_termination():
        try:
            if not client.healthy():
                console.print("starting the embedded stack (SQLite + embedded Redis + API + worker)...")
                stack = Stack(config, extra_env={"WORKER_MODEL": model} if model else None)
                stack.start()
            fields = _batch_fields(model, width, height, steps, seed, sizes, seeds)
            created = client.submit_file(prompts_file, fields)
            console.print(f"batch {created['id']}: {len(created['job_ids'])} jobs queued")
            alive = stack.worker_alive if stack is not None else None
            summary = follow_batch(client, created["id"], console, worker_alive=alive)
            _download(client, created["id"], out)
            if summary["counts"]["failed"]:
                fail(f"{summary['counts']['failed']} jobs failed; see `nightrender status {created['id']}`")
        except (ApiError, WorkerGone, StackError) as error:
            fail(str(error))
        finally:
            if stack is not None:
                with shielded():
                    stack.stop()


COMMANDS: tuple[Callable[..., None], ...] = (submit, run, status, cancel, retry, pause, resume, download)
