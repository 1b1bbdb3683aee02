"""The CLI on the embedded default: SQLite, an embedded Redis, the API and a worker, from one command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e
CLI = [sys.executable, "-m", "cli.main"]


def free_port() -> int:
    """A TCP port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embedded_env(tmp_path: Path, model_cache: Path) -> dict[str, str]:
    """An environment with no DATABASE_URL or REDIS_URL, so the CLI starts everything itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "WORKER_MODEL")}
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        MODEL_CACHE_DIR=str(model_cache),
        EMBEDDED_REDIS_PORT=str(free_port()),
        API_PORT=str(free_port()),
        QUEUE_NAME="nr-cli-test",
    )
    return env


def test_run_renders_a_prompt_file_on_the_embedded_default(tmp_path: Path, model_cache: Path) -> None:
    """`nightrender run` starts the stack, renders, downloads every image and prints the memory table."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red fox\n\na blue whale\na green frog\n")
    out = tmp_path / "renders"
    command = [
        *CLI,
        "run",
        str(prompts),
        "--model",
        "synthetic:tiny",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        command,
        env=embedded_env(tmp_path, model_cache),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Memory by resolution" in done.stdout
    images = sorted(out.glob("*/*.png"))
    assert len(images) == 3
    prompts = {Image.open(p).text["parameters"].split("\n")[0] for p in images}  # A1111's first line
    assert prompts == {"a red fox", "a blue whale", "a green frog"}
    assert (tmp_path / "data" / "nightrender.db").exists()


def test_worker_refuses_a_real_model_without_cuda(tmp_path: Path, model_cache: Path) -> None:
    """With no CUDA device, the worker exits at once with a message instead of crawling."""
    env = {**embedded_env(tmp_path, model_cache), "WORKER_MODEL": "Tongyi-MAI/Z-Image-Turbo"}
    done = subprocess.run(
        [*CLI, "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 2
    assert "CUDA" in done.stdout + done.stderr


def test_submit_rejects_a_bad_size_with_the_reason(tmp_path: Path, model_cache: Path) -> None:
    """A CLI error names the field and the reason; the API stays up only for the test's duration."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    env = embedded_env(tmp_path, model_cache)
    env["API_URL"] = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [*CLI, "submit", str(prompts), "--width", "70"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode != 0
