"""GPU benchmark: synthetic:full (Z-Image-Turbo's exact architecture) at 1024x1024, 9 steps.

In one run on one card it measures diffusers with everything on the GPU (the reference), the VRAM
guides' sequential offload, diffusers group offload, and nightrender's engine at 12, 8 and 6 GB caps,
for single jobs and for 16 queued prompts, plus 50 mixed-size jobs at 8 GB. Every row carries its
throughput ratio against the reference of the same run. Rows are written as they finish, so a run cut
short still reports what it measured.

    python bench/run_bench.py --out bench/results/h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engine import Engine, RenderRequest, load_pipeline
from worker.engine.budget import apply_device_cap
from worker.engine.costs import GB, ActivationModel, Budget
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS
from worker.engine.render import decode_latents

PROMPT = "a lighthouse on a cliff above a stormy sea at dusk, oil painting, dramatic light"
SIZE, STEPS = 1024, 9
CAPS_GB = (12, 8, 6)
MIXED_SIZES = [
    (512, 512),
    (768, 768),
    (1024, 1024),
    (1536, 1536),
    (1024, 768),
    (768, 1344),
    (1344, 768),
    (1536, 1024),
    (512, 1024),
    (1216, 832),
]
DEVICE = torch.device("cuda", 0)


class Recorder:
    """Collects result rows and rewrites the JSON file after each one."""

    def __init__(self, path: Path, card: str) -> None:
        self.path, self.card = path, card
        self.rows: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {"card": card, "torch": torch.__version__, "size": SIZE, "steps": STEPS}
        self.reference_s: float | None = None

    def add(self, row: dict[str, Any]) -> None:
        """Add a row, with its ratio against the reference, and save."""
        s = row.get("s_per_image")
        row["ratio"] = round(self.reference_s / s, 3) if (self.reference_s and s) else None
        row["card"] = self.card
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        """Write everything measured so far."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=2))


def set_cap(cap_gb: float | None) -> None:
    """The emulated consumer card: a hard allocator cap (None lifts it)."""
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    fraction = 1.0 if cap_gb is None else cap_gb * GB / total
    torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), DEVICE)


def fresh_peaks() -> None:
    """Start a measurement from a clean allocator."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(DEVICE)


def gigabytes(value: float | None) -> float | None:
    """Bytes as GB, rounded."""
    return None if value is None else round(value / GB, 3)


def time_diffusers(pipe: Any, images: int, size: tuple[int, int] = (SIZE, SIZE)) -> tuple[float, int]:
    """Seconds per image of the plain diffusers call after one warm-up, and the peak reserved bytes."""

    def one(seed: int) -> None:
        generator = torch.Generator("cpu").manual_seed(seed)
        pipe(
            PROMPT,
            width=size[0],
            height=size[1],
            num_inference_steps=STEPS,
            guidance_scale=0.0,
            generator=generator,
            output_type="pil",
        )

    one(0)
    fresh_peaks()
    started = time.perf_counter()
    for seed in range(images):
        one(seed + 1)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / images, torch.cuda.max_memory_reserved(DEVICE)


def load(cache: Path, model: str = "synthetic:full") -> Any:
    """Load through the same from_pretrained path the worker uses (weights in host memory)."""
    return load_pipeline(model, dtype="bf16", cache_dir=cache, device=DEVICE)


def stage_reference(rec: Recorder, cache: Path, args: argparse.Namespace) -> ActivationModel:
    """Diffusers with everything on the GPU and no cap; also measures activation peaks for calibration."""
    loaded = load(cache)
    set_cap(None)
    loaded.pipeline.to(DEVICE)
    s, reserved = time_diffusers(loaded.pipeline, args.images)
    rec.reference_s = s
    rec.add(
        {
            "name": "diffusers all on GPU (reference)",
            "cap_gb": None,
            "images": args.images,
            "s_per_image": round(s, 3),
            "peak_reserved_gb": gigabytes(reserved),
            "predicted_peak_gb": None,
        }
    )
    activations = calibrate(loaded, rec)
    loaded.pipeline.to("cpu")
    return activations


def calibrate(loaded: Any, rec: Recorder) -> ActivationModel:
    """Peak bytes above the weights, per phase and size, fitted as base + per_pixel x pixels."""
    pipe = loaded.pipeline
    points = []
    for width, height in [(512, 512), (1024, 1024), (1536, 1536), (1344, 768)]:
        fresh_peaks()
        weights = torch.cuda.memory_allocated(DEVICE)
        with torch.inference_mode():
            positive, _ = pipe.encode_prompt(prompt=PROMPT, device=DEVICE, do_classifier_free_guidance=False)
            encode = torch.cuda.max_memory_allocated(DEVICE) - weights
            fresh_peaks()
            latents = pipe(
                prompt_embeds=positive,
                width=width,
                height=height,
                num_inference_steps=2,
                guidance_scale=0.0,
                output_type="latent",
            ).images
            denoise = torch.cuda.max_memory_allocated(DEVICE) - weights
            fresh_peaks()
            decode_latents(loaded, latents)
            decode = torch.cuda.max_memory_allocated(DEVICE) - weights
        points.append(
            {"width": width, "height": height, "encode": encode, "denoise": denoise, "decode": decode}
        )
    rec.meta["calibration_points"] = points
    rec.meta["speed"] = measure_speed(loaded)
    return fit_activations(points)


def seconds_of(fn: Any) -> float:
    """Wall seconds of a GPU call, synchronised."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def measure_speed(loaded: Any) -> dict[str, float]:
    """The speed model's constants: compute per step, decode plain and tiled, host-to-device bandwidth."""
    from worker.engine.placement import set_vae_tiling

    pipe = loaded.pipeline
    with torch.inference_mode():
        positive, _ = pipe.encode_prompt(prompt=PROMPT, device=DEVICE, do_classifier_free_guidance=False)

        def denoise(steps: int) -> Any:
            return pipe(
                prompt_embeds=positive,
                width=SIZE,
                height=SIZE,
                num_inference_steps=steps,
                guidance_scale=0.0,
                output_type="latent",
            ).images

        latents = denoise(2)
        step = (seconds_of(lambda: denoise(6)) - seconds_of(lambda: denoise(2))) / 4
        plain = seconds_of(lambda: decode_latents(loaded, latents))
        set_vae_tiling(pipe, True)
        decode_latents(loaded, latents)
        tiled = seconds_of(lambda: decode_latents(loaded, latents))
        set_vae_tiling(pipe, False)
    host = torch.empty(2 * GB, dtype=torch.uint8).pin_memory()
    host.to(DEVICE)
    copy = seconds_of(lambda: host.to(DEVICE, non_blocking=True))
    return {
        "step_seconds_1024": step,
        "decode_seconds_1024": plain,
        "tiled_decode_seconds_1024": tiled,
        "pinned_gb_per_s": 2 / copy,
    }


def fit_activations(points: list[dict[str, int]]) -> ActivationModel:
    """Least squares through the measured peaks, then shifted up so every point is covered."""

    def line(key: str) -> tuple[int, float]:
        xs = [p["width"] * p["height"] for p in points]
        ys = [p[key] for p in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mean_x) ** 2 for x in xs
        )
        base = max(y - slope * x for x, y in zip(xs, ys, strict=True))
        return int(base), float(slope)

    denoise_base, denoise_slope = line("denoise")
    decode_base, decode_slope = line("decode")
    return ActivationModel(
        encode_base=max(p["encode"] for p in points),
        denoise_base=denoise_base,
        denoise_per_pixel=denoise_slope,
        decode_base=decode_base,
        decode_per_pixel=decode_slope,
    )


def budget_of(cap_gb: float) -> Budget:
    """A cap as the engine's budget, with the allocator capped to match."""
    budget = Budget(device_bytes=int(cap_gb * GB), host_pinned_bytes=96 * GB)
    apply_device_cap(budget, DEVICE)
    return budget


def run_jobs(engine: Engine, requests: list[RenderRequest]) -> list[Any]:
    """Render one after another through the engine's ladder."""
    return [engine.render(request) for request in requests]


def engine_row(name: str, cap: float, results: list[Any], seconds: float, engine: Engine) -> dict[str, Any]:
    """A result row with the per-phase breakdown and what streaming moved."""
    stats = [r.stats for r in results]
    plan = engine.plan
    streamed = engine.placement.streamed_bytes_per_step if engine.placement else 0
    return {
        "name": name,
        "cap_gb": cap,
        "images": len(results),
        "s_per_image": round(seconds / len(results), 3),
        "peak_reserved_gb": gigabytes(max(s.peak_reserved_bytes or 0 for s in stats)),
        "peak_allocated_gb": gigabytes(max(s.peak_allocated_bytes or 0 for s in stats)),
        "predicted_peak_gb": gigabytes(max(s.predicted_peak_bytes or 0 for s in stats)),
        "plan": plan.describe() if plan else None,
        "streamed_gb_per_step": gigabytes(streamed),
        "encode_s": round(sum(s.encode_s for s in stats) / len(stats), 3),
        "denoise_s": round(sum(s.denoise_s for s in stats) / len(stats), 3),
        "decode_s": round(sum(s.decode_s for s in stats) / len(stats), 3),
        "ooms": sum(s.oom_attempts for s in stats),
    }


def request(seed: int, size: tuple[int, int] = (SIZE, SIZE), steps: int = STEPS) -> RenderRequest:
    """One job."""
    return RenderRequest(
        prompt=f"{PROMPT} #{seed}", width=size[0], height=size[1], steps=steps, guidance_scale=0.0, seed=seed
    )


def stage_engine(rec: Recorder, engine: Engine, args: argparse.Namespace) -> None:
    """The engine at each cap: single jobs, then 16 queued prompts encoded in groups."""
    for cap in CAPS_GB:
        engine.set_budget(budget_of(cap))
        engine.render(request(0))  # warm-up: placement and kernels
        started = time.perf_counter()
        results = run_jobs(engine, [request(i + 1) for i in range(args.images)])
        torch.cuda.synchronize()
        rec.add(
            engine_row(
                f"nightrender engine, single jobs @ {cap} GB",
                cap,
                results,
                time.perf_counter() - started,
                engine,
            )
        )
        started = time.perf_counter()
        results = run_queued(engine, args.queued)
        rec.add(
            engine_row(
                f"nightrender engine, {args.queued} queued prompts @ {cap} GB",
                cap,
                results,
                time.perf_counter() - started,
                engine,
            )
        )


def run_queued(engine: Engine, count: int, group: int = 4) -> list[Any]:
    """Encode prompts a group at a time (one pass of the streamed text encoder each), then render."""
    results = []
    for start in range(0, count, group):
        requests = [request(100 + i) for i in range(start, min(count, start + group))]
        positive, _negative = engine.encode([r.prompt for r in requests], None, 0.0, SIZE, SIZE)
        for i, req in enumerate(requests):
            result = engine.render(req, embeds=([positive[i]], []))
            result.stats.encode_s = 0.0
            results.append(result)
    torch.cuda.synchronize()
    return results


def stage_mixed(rec: Recorder, cache: Path, acts: ActivationModel, args: argparse.Namespace) -> None:
    """Every size from 512 to 1536 (non-square too) at each budget: the first rung must fit, and the
    predicted peak should be within 5% of the measured one. Sizes run smallest first, so each new size
    is the largest yet and the engine plans for it; then the smaller ones run again on that placement.
    """
    loaded = load(cache)
    ordered = sorted(MIXED_SIZES, key=lambda size: size[0] * size[1])
    for cap in [float(b) for b in args.mixed_budgets.split(",")]:
        engine = Engine(loaded, mode="auto", budget=budget_of(cap), activations=acts, compile=args.compile)
        requests = [request(i, size, steps=args.mixed_steps) for i, size in enumerate(ordered + ordered)]
        started = time.perf_counter()
        results = run_jobs(engine, requests)
        rec.add(mixed_row(cap, results, time.perf_counter() - started, engine, args))
        engine.place_on_host()
        loaded = engine.loaded


def mixed_row(
    cap: float, results: list[Any], seconds: float, engine: Engine, args: argparse.Namespace
) -> dict[str, Any]:
    """A mixed-size row: prediction errors, out-of-memory retries, jobs over the cap, per-size detail."""
    row = engine_row(
        f"nightrender engine, {len(results)} mixed sizes @ {cap:g} GB ({args.mixed_steps} steps)",
        cap,
        results,
        seconds,
        engine,
    )
    errors = [
        abs((r.stats.peak_allocated_bytes or 0) - (r.stats.predicted_peak_bytes or 0))
        / max(1, r.stats.peak_allocated_bytes or 1)
        for r in results
    ]
    row.update(
        s_per_image=None,
        max_prediction_error=round(max(errors), 3),
        mean_prediction_error=round(sum(errors) / len(errors), 3),
        over_budget=sum((r.stats.peak_reserved_bytes or 0) > cap * GB for r in results),
        rungs=sorted({r.stats.rung for r in results}),
        replacements=sum(r.stats.placement_changed for r in results),
        per_job=[
            {
                "size": list(size),
                "predicted_gb": gigabytes(r.stats.predicted_peak_bytes),
                "allocated_gb": gigabytes(r.stats.peak_allocated_bytes),
                "reserved_gb": gigabytes(r.stats.peak_reserved_bytes),
                "rung": r.stats.rung,
                "attempts": len(r.stats.attempts),
                "placed_s": round(r.stats.place_s, 3),
                "recompiles": r.stats.recompiles,
                "denoise_s": round(r.stats.denoise_s, 3),
            }
            for size, r in zip(sorted(MIXED_SIZES, key=lambda s: s[0] * s[1]) * 2, results, strict=False)
        ],
    )
    return row


def stage_compiled_match(rec: Recorder, cache: Path, acts: ActivationModel, args: argparse.Namespace) -> None:
    """Streamed and compiled pixels against eager, everything resident, same seed: the bf16 tolerance."""
    import numpy as np

    loaded = load(cache)
    set_cap(None)
    eager = Engine(loaded, mode="auto", budget=Budget(120 * GB, 96 * GB), activations=acts)
    reference = [np.asarray(eager.render(request(seed)).image, dtype=np.int16) for seed in (5, 6)]
    eager.place_on_host()
    compiled = Engine(eager.loaded, mode="auto", budget=budget_of(12), activations=acts, compile=True)
    warm = compiled.warm_up([(SIZE, SIZE), (896, 1152)])
    started = time.perf_counter()
    results = [compiled.render(request(seed)) for seed in (5, 6)]
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    diffs = [
        np.abs(np.asarray(r.image, dtype=np.int16) - ref) for r, ref in zip(results, reference, strict=True)
    ]
    row = engine_row("nightrender engine, compiled + streamed @ 12 GB", 12, results, seconds, compiled)
    row.update(
        warm_up_s=round(warm, 1),
        max_abs_pixel_diff=int(max(d.max() for d in diffs)),
        mean_abs_pixel_diff=round(float(sum(d.mean() for d in diffs) / len(diffs)), 3),
        share_over_8=round(float(sum((d > 8).mean() for d in diffs) / len(diffs)), 5),
    )
    rec.add(row)
    compiled.place_on_host()


def stage_diffusers_offload(rec: Recorder, cache: Path, mode: str, images: int) -> None:
    """A diffusers offload recipe at a 12 GB cap, on a freshly loaded pipeline."""
    set_cap(12)
    loaded = load(cache)
    if mode == "group":
        loaded.pipeline.enable_group_offload(
            onload_device=DEVICE, offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
    else:
        loaded.pipeline.enable_sequential_cpu_offload(device=DEVICE)
    s, reserved = time_diffusers(loaded.pipeline, images)
    rec.add(
        {
            "name": f"diffusers {mode} offload",
            "cap_gb": 12,
            "images": images,
            "s_per_image": round(s, 3),
            "peak_reserved_gb": gigabytes(reserved),
            "predicted_peak_gb": None,
        }
    )


def stage_smoke(cache: Path) -> None:
    """Streaming must not change the image: tiny model, everything resident vs every block streamed."""
    loaded = load(cache, "synthetic:tiny")
    resident_engine = Engine(
        loaded, mode="auto", budget=Budget(80 * GB, 8 * GB), activations=DEFAULT_ACTIVATIONS
    )
    resident = resident_engine.render(request(1, (256, 256), 2)).image
    resident_engine.place_on_host()
    sizes = resident_engine.sizes
    floor = sizes.transformer_rest + sizes.vae + sizes.text_encoder_rest + 4 * max(sizes.transformer_blocks)
    streaming = Engine(
        loaded, mode="stream", budget=Budget(floor, 8 * GB), activations=ActivationModel(0, 0, 0, 0, 0)
    )
    streamed = streaming.render(request(1, (256, 256), 2)).image
    same = resident.tobytes() == streamed.tobytes()
    print(
        json.dumps({"smoke_streaming_identical": same, "plan": streaming.plan and streaming.plan.describe()})
    )
    streaming.place_on_host()
    if not same:
        raise SystemExit("streaming changed the image")


def main() -> None:
    """Run the stages named on the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest.json"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/nightrender-models"))
    parser.add_argument("--stages", default="smoke,reference,engine,mixed,group,sequential")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--queued", type=int, default=16)
    parser.add_argument("--mixed", type=int, default=50)
    parser.add_argument("--mixed-steps", type=int, default=4)
    parser.add_argument("--mixed-budgets", default="4,6,8,12")
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks")
    args = parser.parse_args()
    stages = args.stages.split(",")
    rec = Recorder(args.out, torch.cuda.get_device_name(DEVICE))
    if "smoke" in stages:
        stage_smoke(args.cache)
    acts = DEFAULT_ACTIVATIONS
    if "reference" in stages:
        acts = stage_reference(rec, args.cache, args)
        rec.meta["activations"] = acts.__dict__
        rec.save()
    if "compiled" in stages:
        stage_compiled_match(rec, args.cache, acts, args)
    if "engine" in stages:
        engine = Engine(
            load(args.cache), mode="auto", budget=budget_of(12), activations=acts, compile=args.compile
        )
        stage_engine(rec, engine, args)
        engine.place_on_host()
        del engine
    if "mixed" in stages:
        stage_mixed(rec, args.cache, acts, args)
    for mode in ("group", "sequential"):
        if mode in stages:
            stage_diffusers_offload(rec, args.cache, mode, 2 if mode == "group" else 1)


if __name__ == "__main__":
    main()
