"""One MODEL_CACHE_DIR shared by several workers (one per GPU): a synthetic model is built once, not raced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from worker.engine.synthetic import COMPLETE_MARKER

ROOT = Path(__file__).resolve().parents[2]
# A worker's start as far as the model cache goes: imports first, then load_pipeline once told to go, so
# both processes reach the empty cache together. It prints the transformer's parameter count.
LOADER = """
import logging, sys, time
from pathlib import Path
import torch
from worker.engine.loading import load_pipeline

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
cache, go = Path(sys.argv[1]), Path(sys.argv[2])
print("waiting", flush=True)
while not go.exists():
    time.sleep(0.01)
loaded = load_pipeline("synthetic:tiny", dtype="fp32", cache_dir=cache, device=torch.device("cpu"))
print(sum(p.numel() for p in loaded.pipeline.transformer.parameters()), flush=True)
"""


def test_two_workers_starting_on_an_empty_cache_build_the_model_once_and_both_load_it(tmp_path: Path) -> None:
    cache, go = tmp_path / "models", tmp_path / "go"
    loaders = [
        subprocess.Popen(
            [sys.executable, "-c", LOADER, str(cache), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for loader in loaders:
            assert loader.stdout is not None and loader.stdout.readline().strip() == "waiting"
        go.touch()  # both are past their imports: they ask for the model at the same moment
        outputs = [loader.communicate(timeout=300) for loader in loaders]
    finally:
        for loader in loaders:
            if loader.poll() is None:
                loader.kill()
                loader.wait()
    assert [loader.returncode for loader in loaders] == [0, 0], [err[-2000:] for _, err in outputs]
    counts = {out.split()[-1] for out, _ in outputs}
    assert len(counts) == 1 and int(counts.pop()) > 0  # both loaded the same saved pipeline
    builds = [line for _, err in outputs for line in err.splitlines() if "built synthetic:tiny" in line]
    assert len(builds) == 1, builds  # the second waited for the first's build, then loaded it
    assert (cache / "synthetic-tiny" / COMPLETE_MARKER).is_file()
    assert [path.name for path in cache.iterdir() if path.name.startswith(".build-")] == []
