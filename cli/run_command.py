"""`nightrender run`: start (or use) a stack, submit a prompt file once, follow it, download the images.

Resumable: the same file and options map to the same batch (`cli/resume.py`), so after Ctrl-C, a closed
terminal or a crash, the same command attaches to the batch, downloads what is done and follows the rest.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer

from cli.client import ApiError, Client
from cli.common import Budget, Gpus, Model, Size, chosen_gpus, console, fail, settings
from cli.downloads import download_batch
from cli.render_options import (
    Dtype,
    DtypeChoice,
    Guidance,
    NegativePrompt,
    Out,
    Priority,
    Seed,
    Seeds,
    Sizes,
    Steps,
    batch_fields,
)
from cli.render_views import WorkerGone, follow_batch, memory_table, warnings_text
from cli.resume import resume_command, run_key
from cli.signals import interrupt_on_termination, shielded
from jobs.states import TERMINAL

if TYPE_CHECKING:
    from cli.stack import Stack

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
New = Annotated[
    bool,
    typer.Option("--new", help="Submit a fresh batch even if this file and these options made one before"),
]
Nonce = Annotated[
    str | None,
    typer.Option(help="Set by the resume command a `--new` run prints: attaches to that run's batch"),
]


def run(
    prompts_file: Annotated[Path, typer.Argument(help="A .txt (a prompt a line), .csv or .jsonl file")],
    out: Out = Path("renders"),
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
    budget: Budget = None,
    gpus: Gpus = None,
    new: New = False,
    nonce: Nonce = None,
) -> None:
    """The main job: start (or use) the stack, submit once, follow, download, print memory; resumable."""
    if not prompts_file.is_file():
        fail(f"no prompts file at {prompts_file}")
    if new and nonce:
        fail("--new and --nonce exclude each other")
    try:
        fields = batch_fields(
            model=model, width=width, height=height, steps=steps, seed=seed, sizes=sizes, seeds=seeds,
            negative_prompt=negative_prompt, guidance=guidance, priority=priority, dtype=dtype,
        )  # fmt: skip
    except ValueError as error:
        fail(str(error))
    chosen = chosen_gpus(gpus)  # checked before anything is submitted or started
    nonce = secrets.token_hex(8) if new else nonce
    key = run_key(prompts_file.read_bytes(), prompts_file.suffix, fields, nonce)
    resume = resume_command(sys.argv, nonce if new else None)
    _run(prompts_file, fields, key, out=out, model=model, budget=budget, gpus=chosen, resume=resume)


def _run(
    prompts_file: Path,
    fields: dict[str, str],
    key: str,
    *,
    out: Path,
    model: str | None,
    budget: str | None,
    gpus: list[int] | None,
    resume: str,
) -> None:
    from cli.stack import StackError

    client = Client.for_settings(settings())
    stack: Stack | None = None
    batch_id: str | None = None
    # SIGTERM and SIGHUP act like Ctrl-C: the stack stops, and the resume command is printed.
    with interrupt_on_termination():
        try:
            stack = _stack_for(client, model, budget, gpus)
            if stack is not None:
                stack.start()
            created = client.submit_file(prompts_file, fields, idempotency_key=key)
            batch_id = created["id"]
            _render(client, created, out, stack)
        except KeyboardInterrupt:
            with shielded():
                _say_interrupted(client, batch_id, resume, stack_stops=stack is not None)
            raise typer.Exit(INTERRUPTED) from None
        except (ApiError, WorkerGone, StackError) as error:
            fail(str(error))
        finally:
            if stack is not None:
                with shielded():
                    stack.stop()


def _stack_for(client: Client, model: str | None, budget: str | None, gpus: list[int] | None) -> Stack | None:
    """A stack to start when no API answers (one worker per GPU with --gpus); None (with a word on
    --budget and --gpus) when one does."""
    from cli.process_commands import worker_overrides
    from cli.stack import Stack

    if not client.healthy():
        if settings().api_url:  # a stack elsewhere that does not answer: starting one here would not help
            fail(f"no nightrender API answers at {settings().api_url} (API_URL / --api-url)")
        workers = f"{len(gpus)} workers, one per GPU" if gpus else "worker"
        console.print(f"starting the embedded stack (SQLite + embedded Redis + API + {workers})...")
        return Stack(settings(), extra_env=worker_overrides(model, budget), exclusive=True, gpus=gpus)
    url = settings().resolved_api_url()
    if gpus is not None:
        console.print(
            f"[yellow]warning:[/yellow] --gpus does not apply: the API at {url} is already up, with its own "
            "workers (`nightrender stop`, then run again, to start one per GPU)"
        )
    if budget is not None:
        console.print(
            f"[yellow]warning:[/yellow] --budget does not apply: the API at {url} is already up, with "
            "its own worker and budget (`nightrender stop`, then run again, to start one with it)"
        )
    if model is not None:
        console.print(
            f"[yellow]note:[/yellow] the API at {url} is already up: its workers keep their models, and "
            f"jobs for {model} are taken by a worker that serves it (--model does not restart one)"
        )
    return None


def _render(client: Client, created: dict[str, Any], out: Path, stack: Stack | None) -> None:
    """Follow the batch (attaching to it if it existed), download the images and print the memory."""
    batch_id = created["id"]
    if created.get("created", True):
        console.print(f"batch {batch_id}: {len(created['job_ids'])} jobs queued")
    else:
        _attach(client, batch_id, out)
    for line in warnings_text(created):
        console.print(line)
    summary = follow_batch(client, batch_id, console, worker_alive=stack.worker_alive if stack else None)
    downloaded = download_batch(client, batch_id, out, console)
    console.print(memory_table(downloaded.jobs))
    console.print(
        f"{downloaded.images} of {len(downloaded.jobs)} images are in {downloaded.folder.resolve()}"
    )
    if summary["counts"]["failed"]:
        fail(f"{summary['counts']['failed']} jobs failed; `nightrender status {batch_id}` shows why")


def _attach(client: Client, batch_id: str, out: Path) -> None:
    """Say that this run attaches to an earlier batch, and download what it has done."""
    summary = client.batch(batch_id)
    done = sum(summary["counts"][state] for state in TERMINAL)
    console.print(
        f"batch {batch_id}: attached to the batch this file and these options made before "
        f"({done} of {summary['total']} done; --new submits a fresh one)"
    )
    if summary["counts"]["succeeded"] and done < summary["total"]:
        downloaded = download_batch(client, batch_id, out, console)
        console.print(f"the {downloaded.images} images done so far are in {downloaded.folder.resolve()}")


def _say_interrupted(client: Client, batch_id: str | None, resume: str, *, stack_stops: bool) -> None:
    """How many jobs are left, where they go on, and the exact command that resumes."""
    if batch_id is None:
        console.print(
            "\ninterrupted before the API confirmed the batch (the same command never submits it twice)"
        )
    else:
        console.print(f"\ninterrupted: {_jobs_left(client, batch_id)} in batch {batch_id}")
        where = (
            "they stay queued and render when a stack runs again"
            if stack_stops
            else "they stay queued on the running stack"
        )
        console.print(where)
    console.print("resume with:")
    console.print(resume, markup=False, highlight=False, soft_wrap=True)


def _jobs_left(client: Client, batch_id: str) -> str:
    try:
        summary = client.batch(batch_id)
    except (ApiError, httpx.HTTPError):
        return "some jobs left (the API did not answer)"
    left = summary["total"] - sum(summary["counts"][state] for state in TERMINAL)
    return f"{left} of {summary['total']} jobs left"
