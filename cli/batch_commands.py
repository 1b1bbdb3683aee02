"""Batch and job commands: submit, run, status, job, batches, cancel, retry, pause, resume, download."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import ApiError, Client
from cli.common import Model, Size, console, fail, settings
from cli.downloads import download_batch
from cli.render_options import (
    Dtype,
    DtypeChoice,
    Guidance,
    Json,
    NegativePrompt,
    Out,
    Priority,
    Seed,
    Seeds,
    Sizes,
    Steps,
    batch_fields,
)
from cli.render_views import follow_batch, memory_table, warnings_text
from cli.run_command import INTERRUPTED, run
from cli.status_views import FAILED_SHOWN, batch_status_view, batches_table, job_view

BatchIdArgument = Annotated[
    str, typer.Argument(help="The batch's id, as `submit`, `run` or `batches` print it")
]
JobIdArgument = Annotated[str, typer.Argument(help="The job's id, as `status` or the manifest lists it")]
OptionalBatchId = Annotated[str | None, typer.Argument(help="The batch's id (or give --job)")]
JobOption = Annotated[str | None, typer.Option("--job", help="One job's id instead of a whole batch")]
PromptsFile = Annotated[Path, typer.Argument(help="A .txt (a prompt a line), .csv or .jsonl file")]


def _client() -> Client:
    return Client.for_settings(settings())


def _checked_id(kind: str, value: str) -> str:
    """The id, or a clear error before any request: ids are UUIDs, and a typo should not reach the API."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        fail(f"{value!r} is not a {kind} id (a UUID, as `nightrender batches` and `status` show)")


def submit(
    prompts_file: PromptsFile,
    model: Model = None,
    width: Size = 1024,
    height: Size = 1024,
    steps: Steps = 9,
    seed: Seed = None,
    sizes: Sizes = None,
    seeds: Seeds = None,
    negative_prompt: NegativePrompt = None,
    guidance: Guidance = 0.0,
    priority: Priority = 0,
    dtype: Dtype = DtypeChoice.BF16,
) -> None:
    """Submit a .txt, .csv or .jsonl prompt file as a batch; prints the batch id."""
    if not prompts_file.is_file():
        fail(f"no prompts file at {prompts_file}")
    try:
        fields = batch_fields(
            model=model, width=width, height=height, steps=steps, seed=seed, sizes=sizes, seeds=seeds,
            negative_prompt=negative_prompt, guidance=guidance, priority=priority, dtype=dtype,
        )  # fmt: skip
        created = _client().submit_file(prompts_file, fields)
    except (ValueError, ApiError) as error:
        fail(str(error))
    console.print(f"batch {created['id']}: {len(created['job_ids'])} jobs queued")
    for line in warnings_text(created):
        console.print(line)


def status(
    batch_id: BatchIdArgument,
    watch: Annotated[bool, typer.Option(help="Follow the batch live until every job is finished")] = False,
    as_json: Json = False,
) -> None:
    """A batch's counts, ETA (or "paused") and failed jobs with their error; live with --watch."""
    batch_id = _checked_id("batch", batch_id)
    client = _client()
    try:
        summary = follow_batch(client, batch_id, console) if watch else client.batch(batch_id)
        if as_json:
            console.print_json(json.dumps(summary))
            return
        failed = _first_failed(client, batch_id) if summary["counts"]["failed"] else []
        console.print(batch_status_view(summary, paused=client.queue()["paused"], failed=failed))
    except ApiError as error:
        fail(str(error))
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None


def _first_failed(client: Client, batch_id: str) -> list[dict[str, Any]]:
    failed: list[dict[str, Any]] = []
    for job in client.jobs_where(batch_id, "failed"):
        failed.append(job)
        if len(failed) == FAILED_SHOWN:
            break
    return failed


def job(job_id: JobIdArgument, as_json: Json = False) -> None:
    """One job: status, parameters, attempts, error and measured memory."""
    job_id = _checked_id("job", job_id)
    try:
        found = _client().job(job_id)
    except ApiError as error:
        fail(str(error))
    if as_json:
        console.print_json(json.dumps(found))
    else:
        console.print(job_view(found))


def batches(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many batches to list")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Where the previous page ended (it prints it)")] = None,
    as_json: Json = False,
) -> None:
    """Your batches, newest first, with their state and counts; pages with --cursor."""
    try:
        page = _client().batches(limit, cursor)
    except ApiError as error:
        fail(str(error))
    if as_json:
        console.print_json(json.dumps(page))
        return
    console.print(batches_table(page["batches"]) if page["batches"] else "no batches yet")
    if page["next_cursor"]:
        console.print(f"older batches: nightrender batches --cursor {page['next_cursor']}", highlight=False)


def cancel(batch_id: OptionalBatchId = None, job: JobOption = None) -> None:
    """Cancel a batch (or one --job): queued jobs stop at once, running ones at their next step."""
    if job:
        answer = _post(f"/v1/jobs/{_checked_id('job', job)}/cancel")
        console.print(f"job {job}: {answer['status']}")
        return
    answer = _post(f"/v1/batches/{_checked_id('batch', _required(batch_id))}/cancel")
    console.print(f"batch {answer['id']}: {answer['status']}, {answer['counts']['cancelled']} jobs cancelled")


def retry(batch_id: OptionalBatchId = None, job: JobOption = None) -> None:
    """Queue again the failed or cancelled jobs of a batch (or one --job), linked to the originals."""
    if job:
        answer = _post(f"/v1/jobs/{_checked_id('job', job)}/retry")
        console.print(f"job {job} queued again as {answer['id']}")
        return
    answer = _post(f"/v1/batches/{_checked_id('batch', _required(batch_id))}/retry")
    console.print(f"batch {answer['id']}: {answer['retried']} jobs queued again")


def pause() -> None:
    """Pause the queue: workers finish their current job and take no more."""
    _post("/v1/queue/pause")
    console.print("queue paused: running jobs finish, no more start (`nightrender resume` continues)")


def resume() -> None:
    """Resume the queue; jobs handed back while paused are published again."""
    answer = _post("/v1/queue/resume")
    console.print(f"queue resumed ({answer['republished']} jobs published again)")


def _post(path: str) -> dict[str, Any]:
    try:
        return _client().post(path)
    except ApiError as error:
        fail(str(error))


def _required(batch_id: str | None) -> str:
    if not batch_id:
        fail("give a BATCH_ID or --job JOB_ID")
    return batch_id


def download(batch_id: BatchIdArgument, out: Out = Path("renders")) -> None:
    """Download a batch's finished images and manifest into OUT/BATCH_ID and print the memory table.

    Exits 1 when jobs are still unfinished (their images come with a later download).
    """
    batch_id = _checked_id("batch", batch_id)
    try:
        downloaded = download_batch(_client(), batch_id, out, console)
    except ApiError as error:
        fail(str(error))
    console.print(memory_table(downloaded.jobs))
    console.print(
        f"{downloaded.images} of {len(downloaded.jobs)} images are in {downloaded.folder.resolve()}"
    )
    if downloaded.unfinished:
        console.print(
            f"[yellow]{downloaded.unfinished} of {len(downloaded.jobs)} jobs are unfinished[/yellow]: "
            f"download again when they are done (`nightrender status {batch_id} --watch` follows them)"
        )
        raise typer.Exit(1)


COMMANDS: tuple[Callable[..., None], ...] = (
    submit,
    run,
    status,
    job,
    batches,
    cancel,
    retry,
    pause,
    resume,
    download,
)
