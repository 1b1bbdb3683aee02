"""The planner as pure arithmetic, on sizes shaped like Z-Image-Turbo in bf16 (no torch models)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from worker.engine.costs import GB, Budget, ModelSizes
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS, DEFAULT_SPEED, calibrated_scale, with_scale
from worker.engine.plan import (
    FRAGMENTATION_HEADROOM,
    TEXT_ENCODER_LOOKAHEAD,
    TRANSFORMER_LOOKAHEAD,
    Plan,
    diffusers_plan,
    plan_ladder,
    predicted_seconds,
    same_placement,
    stream_buffers,
    usable,
)
from worker.engine.spread import spread_resident

ACTS = DEFAULT_ACTIVATIONS
BLOCK = int(0.36 * GB)
LAYER = int(0.2 * GB)
BLOCKS = 34  # 2 noise refiners, 2 context refiners, 30 main layers
LAYERS = 36
# Z-Image-Turbo at bf16: a 12.3 GB transformer, a Qwen3-4B text encoder (0.78 GB of it the embedding table).
ZIMAGE = ModelSizes(
    transformer_blocks=(BLOCK,) * BLOCKS,
    transformer_rest=int(0.1 * GB),
    text_encoder_blocks=(LAYER,) * LAYERS,
    text_encoder_rest=int(0.01 * GB),
    text_encoder_embedding=int(0.78 * GB),
    vae=int(0.17 * GB),
)
# The rungs that come first in a fixed order; the streaming rungs are then ranked by predicted seconds.
HEAD_ORDER = ("resident", "te_streamed")
STREAMING = ("stream", "stream_tiled")
STEPS = 9
HOST = 64 * GB
SQUARE = [(1024, 1024), (1536, 1536), (2048, 2048)]
SIZES = [(512, 512), (768, 768), (1024, 1024), (1280, 720), (1280, 1280), (1536, 1536), (2048, 2048)]
BUDGETS_GB = [48, 40, 32, 24, 20, 16, 14, 12, 10, 8, 7, 6, 5, 4, 3, 2.5, 2, 1.5]


def budget(gigabytes: float, host: int = HOST) -> Budget:
    """A device budget of this many GB and plenty of pinned host memory unless told."""
    return Budget(device_bytes=int(gigabytes * GB), host_pinned_bytes=host)


def ladder(gigabytes: float, width: int = 1024, height: int = 1024, host: int = HOST) -> list[Plan]:
    """The Z-Image ladder at this budget and size."""
    return plan_ladder(ZIMAGE, ACTS, budget(gigabytes, host), width, height, speed=DEFAULT_SPEED, steps=STEPS)


def seconds(plan: Plan, width: int = 1024, height: int = 1024) -> float:
    """The speed model's predicted seconds for one image under `plan`."""
    return predicted_seconds(plan, DEFAULT_SPEED, ZIMAGE, width, height, STEPS)


def expected_peak(width: int, height: int, *, resident: int, te_streamed: bool, tiled: bool) -> int:
    """The documented cost model, written out independently of plan.py for equal blocks and layers."""
    weights = ZIMAGE.transformer_rest + resident * BLOCK + ZIMAGE.vae
    weights += ZIMAGE.text_encoder_rest if te_streamed else ZIMAGE.text_encoder
    encode = ACTS.encode() + ((TEXT_ENCODER_LOOKAHEAD + 1) * LAYER if te_streamed else 0)
    denoise = ACTS.denoise(width, height) + ((TRANSFORMER_LOOKAHEAD + 1) * BLOCK if resident < BLOCKS else 0)
    decode = ACTS.decode(width, height, tiled=tiled)
    return weights + max(encode, denoise, decode)


def fits(peak: int, gigabytes: float) -> bool:
    """Whether a predicted peak fits the usable part of a budget."""
    return peak <= usable(budget(gigabytes))


def most_resident_streaming(gigabytes: float, width: int, height: int, *, tiled: bool) -> int | None:
    """The most blocks a streaming placement (text encoder streamed) keeps resident and still fits."""
    for resident in range(BLOCKS, -1, -1):
        if fits(expected_peak(width, height, resident=resident, te_streamed=True, tiled=tiled), gigabytes):
            return resident
    return None


def streaming_placement(
    resident: int, *, tiled: bool, width: int = 1024, height: int = 1024, host: int = HOST
) -> Plan:
    """A streaming plan built by hand (spread resident blocks, text encoder streamed) for the speed model."""
    pinned = (BLOCKS - resident) * BLOCK + LAYERS * LAYER
    return Plan(
        rung="stream_tiled" if tiled else "stream",
        transformer_resident=spread_resident(BLOCKS, resident),
        text_encoder_streamed=True,
        vae_tiled=tiled,
        predicted_peak_bytes=expected_peak(width, height, resident=resident, te_streamed=True, tiled=tiled),
        pinned_host_bytes=pinned,
        pin_host=pinned <= host,
        transformer_blocks_total=BLOCKS,
    )


def first_of(plans: list[Plan], rung: str) -> Plan:
    """The first plan on this rung (for stream_tiled: the ranked candidate, not the all-streamed floor)."""
    return next(p for p in plans if p.rung == rung)


# the model and its sizes


def test_sizes_are_shaped_like_z_image_turbo_bf16() -> None:
    """The fixture sizes add up to Z-Image-Turbo's bf16 weights."""
    assert 12.2 * GB < ZIMAGE.transformer < 12.4 * GB
    assert 7.9 * GB < ZIMAGE.text_encoder < 8.1 * GB
    assert len(ZIMAGE.transformer_blocks) == 34 and len(ZIMAGE.text_encoder_blocks) == 36


def test_usable_keeps_the_fragmentation_headroom_free() -> None:
    """A plan may fill the cap minus the fragmentation headroom."""
    assert usable(budget(10)) == int(10 * GB * (1 - FRAGMENTATION_HEADROOM))
    assert usable(budget(10)) < 10 * GB


def test_stream_buffers_are_the_largest_blocks_in_flight() -> None:
    """A streamer holds the computing block plus `lookahead` copies, the largest ones counted."""
    assert stream_buffers((1, 5, 3, 4, 2), 2) == 5 + 4 + 3
    assert stream_buffers((7,), 3) == 7
    assert stream_buffers((), 2) == 0


def test_tiled_decode_costs_one_tile_at_most() -> None:
    """Tiling caps the decode's pixels at one tile; below a tile it changes nothing."""
    assert ACTS.decode(2048, 2048, tiled=True) == ACTS.decode(512, 512)
    assert ACTS.decode(2048, 2048, tiled=True) < ACTS.decode(2048, 2048)
    assert ACTS.decode(256, 256, tiled=True) == ACTS.decode(256, 256)


def test_with_scale_scales_every_activation_but_not_weights() -> None:
    """A calibration scale multiplies activations, so fewer blocks stay resident."""
    scaled = with_scale(ACTS, 1.5)
    assert scaled.denoise(1024, 1024) == int(1.5 * (ACTS.denoise_base + ACTS.denoise_per_pixel * 1024 * 1024))
    assert scaled.encode() == int(1.5 * ACTS.encode_base)
    plain = plan_ladder(ZIMAGE, ACTS, budget(8), 1024, 1024)[0]
    pessimistic = plan_ladder(ZIMAGE, scaled, budget(8), 1024, 1024)[0]
    assert len(pessimistic.transformer_resident) < len(plain.transformer_resident)


# the first rung


def test_a_40gb_budget_keeps_everything_resident() -> None:
    """With room for everything nothing streams, tiles or offloads."""
    first = ladder(40)[0]
    assert first.rung == "resident"
    assert first.transformer_resident == frozenset(range(BLOCKS))
    assert not first.text_encoder_streamed and not first.vae_tiled
    assert first.pinned_host_bytes == 0
    assert first.predicted_peak_bytes == expected_peak(
        1024, 1024, resident=BLOCKS, te_streamed=False, tiled=False
    )


@pytest.mark.parametrize(
    ("gigabytes", "width", "expected"),
    [
        (40, 1024, "resident"),
        # A full 1024 decode needs 2.4 GB beside 20.5 GB of weights: just over 24 GB's usable share.
        (24, 1024, "te_streamed"),
        (24, 1536, "te_streamed"),
        (16, 1024, "te_streamed"),
        # 1024x1024 steps take 0.143 s. At 12 GB a full decode keeps 23 blocks (11 streamed, 0.082 s of
        # copies a step, hidden): 1.539 s; a tiled one keeps 26 but decodes 0.089 s slower: 1.628 s.
        (12, 1024, "stream"),
        # At 8 GB a full decode keeps 13 blocks (21 streamed, 0.157 s a step, copy-bound): 1.664 s; a
        # tiled one keeps 15 (19 streamed, 0.142 s, hidden): 1.628 s, so tiling wins.
        (8, 1024, "stream_tiled"),
        # At 6 GB: full decode 8 blocks (0.195 s a step), 2.001 s; tiled 10 blocks (0.180 s), 1.955 s.
        (6, 1024, "stream_tiled"),
        # 1536x1536 steps take 0.323 s, longer than copying all 34 blocks (0.255 s): the full decode with
        # nothing resident (3.276 s) beats the tiled one that keeps 8 blocks (3.476 s).
        (6, 1536, "stream"),
        # A full 2048 decode needs 9.5 GB of activations: only tiling fits (6 blocks resident).
        (6, 2048, "stream_tiled"),
        (2, 1536, "sequential"),
    ],
)
def test_first_rung_at_known_budgets(gigabytes: float, width: int, expected: str) -> None:
    """The first rung at budgets computed from the cost and speed models by hand."""
    assert ladder(gigabytes, width, width)[0].rung == expected


@pytest.mark.parametrize(("width", "height"), [*SQUARE, (1280, 720)])
@pytest.mark.parametrize("gigabytes", BUDGETS_GB)
def test_first_plan_fits_and_no_faster_rung_would(gigabytes: float, width: int, height: int) -> None:
    """The first plan is the fastest that fits.

    It fits; no all-resident rung ahead of it (resident, te_streamed) fits; and among the streaming
    placements that fit (the most resident blocks with a full decode, and with a tiled one) it has the
    lowest predicted seconds.
    """
    first = ladder(gigabytes, width, height)[0]
    resident = len(first.transformer_resident)

    def peak(blocks: int, te_streamed: bool, tiled: bool) -> int:
        return expected_peak(width, height, resident=blocks, te_streamed=te_streamed, tiled=tiled)

    if first.rung != "sequential":
        assert first.predicted_peak_bytes == peak(resident, first.text_encoder_streamed, first.vae_tiled)
        assert fits(first.predicted_peak_bytes, gigabytes)
    if first.rung != "resident":
        assert not fits(peak(BLOCKS, False, False), gigabytes)
    if first.rung != "resident" and first.rung != "te_streamed":
        assert not fits(peak(BLOCKS, True, False), gigabytes)
    candidates = {
        tiled: streaming_placement(count, tiled=tiled, width=width, height=height)
        for tiled in (False, True)
        if (count := most_resident_streaming(gigabytes, width, height, tiled=tiled)) is not None
    }
    if first.rung in STREAMING:
        tiled = first.rung == "stream_tiled"
        assert first.vae_tiled == tiled and first.text_encoder_streamed
        assert first.transformer_resident == candidates[tiled].transformer_resident
        assert seconds(first, width, height) == min(seconds(p, width, height) for p in candidates.values())
    if first.rung == "sequential":
        assert not candidates  # nothing streams into the budget, tiled or not


def test_stream_keeps_fewer_blocks_resident_as_the_budget_shrinks() -> None:
    """At 12, 8 and 6 GB each streaming rung keeps strictly fewer blocks, and the first plan gets slower."""
    ladders = [ladder(gigabytes) for gigabytes in (12, 8, 6)]
    assert [plans[0].rung for plans in ladders] == ["stream", "stream_tiled", "stream_tiled"]
    for rung, tiled in (("stream", False), ("stream_tiled", True)):
        plans = [first_of(plans, rung) for plans in ladders]
        counts = [len(p.transformer_resident) for p in plans]
        # full decode: 23, 13, 8 blocks; tiled decode: 26, 15, 10
        assert BLOCKS > counts[0] > counts[1] > counts[2] > 0, (rung, counts)
        assert all(p.text_encoder_streamed and p.vae_tiled == tiled for p in plans)
    # 1.539 s, 1.628 s, 1.955 s
    times = [seconds(plans[0]) for plans in ladders]
    assert times[0] < times[1] < times[2]


def most_resident(plans: list[Plan], *, plain_decode: bool) -> int:
    """The most blocks any fitting rung keeps resident (only rungs with a plain decode if asked)."""
    counts = [
        len(p.transformer_resident)
        for p in plans
        if p.rung != "sequential" and not (plain_decode and p.vae_tiled)
    ]
    return max(counts, default=-1)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_resident_blocks_never_grow_as_the_budget_shrinks(width: int, height: int) -> None:
    """Over a sweep of budgets, a smaller one never offers more resident blocks with a plain decode."""
    ladders = [ladder(quarter / 4, width, height) for quarter in range(200, 4, -1)]
    counts = [most_resident(plans, plain_decode=True) for plans in ladders]
    assert counts == sorted(counts, reverse=True)
    for larger, smaller in itertools.pairwise(ladders):
        if larger[0].rung == smaller[0].rung:
            assert len(smaller[0].transformer_resident) <= len(larger[0].transformer_resident)
        # A smaller budget never gets a faster first plan.
        assert seconds(smaller[0], width, height) >= seconds(larger[0], width, height)


def test_tiled_decode_when_only_tiling_fits() -> None:
    """At 2048x2048 and 6 GB a plain decode cannot fit even with every block streamed; a tiled one can."""
    assert not fits(expected_peak(2048, 2048, resident=0, te_streamed=True, tiled=False), 6)
    plans = ladder(6, 2048, 2048)
    assert plans[0].rung == "stream_tiled" and plans[0].vae_tiled
    assert 0 < len(plans[0].transformer_resident) < BLOCKS
    assert not [p for p in plans if not p.vae_tiled]


# the whole ladder


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_ladder_ends_with_sequential_and_every_other_rung_fits(width: int, height: int) -> None:
    """Sequential offload ends every ladder, once; every rung before it is predicted to fit."""
    for gigabytes in BUDGETS_GB:
        plans = ladder(gigabytes, width, height)
        assert plans[-1].rung == "sequential"
        assert plans[-1].transformer_resident == frozenset() and plans[-1].pinned_host_bytes == 0
        for plan in plans[:-1]:
            assert plan.rung != "sequential"
            assert plan.predicted_peak_bytes <= usable(budget(gigabytes)), (gigabytes, plan.describe())


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_rungs_appear_in_speed_order(width: int, height: int) -> None:
    """resident and te_streamed lead, then the streaming candidates by predicted seconds, then the
    all-streamed floor, then sequential; predicted seconds never fall down the ladder."""
    for gigabytes in BUDGETS_GB:
        plans = ladder(gigabytes, width, height)
        rungs = [p.rung for p in plans]
        head = [p for p in plans if p.rung in HEAD_ORDER]
        assert plans[: len(head)] == head, (gigabytes, rungs)
        assert [p.rung for p in head] == [rung for rung in HEAD_ORDER if rung in rungs], rungs
        *rest, last = plans[len(head) :]
        assert last.rung == "sequential", rungs
        assert all(p.rung in STREAMING for p in rest), rungs
        # A second stream_tiled rung is the floor: every block streamed, behind a tiled rung keeping some.
        tiled = [p for p in rest if p.rung == "stream_tiled"]
        has_floor = bool(tiled) and bool(tiled[0].transformer_resident)
        if has_floor:
            assert len(tiled) == 2 and rest[-1] is tiled[1], rungs
            assert tiled[1].transformer_resident == frozenset() and tiled[1].text_encoder_streamed
        else:
            assert len(tiled) <= 1, rungs
        candidates = rest[:-1] if has_floor else rest
        assert len({p.rung for p in candidates}) == len(candidates), rungs
        assert not any(same_placement(c, h) for c in candidates for h in head), rungs
        times = [seconds(p, width, height) for p in candidates]
        assert times == sorted(times), (gigabytes, rungs, times)
        everything = [seconds(p, width, height) for p in plans]
        assert everything == sorted(everything), (gigabytes, rungs, everything)


def test_same_placement_compares_where_weights_live_only() -> None:
    """Same resident blocks, encoder placement and decode: the same placement, whatever the rung or peak."""
    plan = streaming_placement(20, tiled=False)
    assert same_placement(plan, replace(plan, rung="te_streamed", predicted_peak_bytes=1, pin_host=False))
    assert not same_placement(plan, replace(plan, vae_tiled=True))
    assert not same_placement(plan, replace(plan, text_encoder_streamed=False))
    assert not same_placement(plan, streaming_placement(21, tiled=False))


def test_tiled_decode_leads_at_8gb_exactly_when_it_is_predicted_faster() -> None:
    """At 8 GB and 1024x1024 the first rung is stream_tiled if and only if it beats the best full decode."""
    full_count = most_resident_streaming(8, 1024, 1024, tiled=False)
    tiled_count = most_resident_streaming(8, 1024, 1024, tiled=True)
    assert (full_count, tiled_count) == (13, 15)
    full = seconds(streaming_placement(13, tiled=False))
    tiled = seconds(streaming_placement(15, tiled=True))
    # full: 9 x 0.157 s (21 blocks copied, slower than the 0.143 s step) + 0.150 s encode + 0.099 s decode
    # tiled: 9 x 0.143 s (19 blocks copied, hidden) + 0.150 s encode + 0.187 s decode
    assert full == pytest.approx(1.6642, abs=1e-4)
    assert tiled == pytest.approx(1.6281, abs=1e-4)
    plans = ladder(8)
    assert (plans[0].rung == "stream_tiled") == (tiled < full)
    assert {p.rung for p in plans[:2]} == set(STREAMING)
    assert seconds(plans[0]) == min(full, tiled) and seconds(plans[1]) == max(full, tiled)


def test_without_a_speed_model_the_full_decode_streams_first() -> None:
    """Without a speed model the planner keeps its fixed order: full decode before tiled."""
    plans = plan_ladder(ZIMAGE, ACTS, budget(8), 1024, 1024)
    assert [p.rung for p in plans] == ["stream", "stream_tiled", "stream_tiled", "sequential"]
    assert [len(p.transformer_resident) for p in plans] == [13, 15, 0, 0]


def test_a_roomy_ladder_falls_back_to_streaming_everything() -> None:
    """Behind the all-resident rungs the ladder keeps a rung that streams every block, then sequential."""
    plans = ladder(40)
    assert [p.rung for p in plans] == [
        "resident",
        "te_streamed",
        "stream_tiled",
        "stream_tiled",
        "sequential",
    ]
    assert plans[1].transformer_resident == frozenset(range(BLOCKS)) and plans[1].text_encoder_streamed
    assert plans[2].transformer_resident == frozenset(range(BLOCKS)) and plans[2].vae_tiled
    assert plans[3].transformer_resident == frozenset() and plans[3].vae_tiled
    peaks = [p.predicted_peak_bytes for p in plans]
    assert peaks == sorted(peaks, reverse=True)


def test_streaming_rungs_stream_the_text_encoder() -> None:
    """Stream rungs stream the text encoder and pin exactly the weights they stream."""
    for gigabytes in BUDGETS_GB:
        for plan in ladder(gigabytes):
            if plan.rung in ("stream", "stream_tiled"):
                streamed = BLOCKS - len(plan.transformer_resident)
                assert plan.text_encoder_streamed
                assert plan.pinned_host_bytes == streamed * BLOCK + LAYERS * LAYER


def test_larger_images_never_keep_more_blocks_resident() -> None:
    """At one budget, a larger image is offered no more resident blocks than a smaller one."""
    areas = sorted(SIZES, key=lambda size: size[0] * size[1])
    for gigabytes in BUDGETS_GB:
        ladders = [(ladder(gigabytes, w, h), (w, h)) for w, h in areas]
        for (small, small_size), (large, large_size) in itertools.combinations(ladders, 2):
            for plain_decode in (False, True):
                smaller_count = most_resident(small, plain_decode=plain_decode)
                assert most_resident(large, plain_decode=plain_decode) <= smaller_count, gigabytes
            if small[0].rung == large[0].rung:
                assert len(large[0].transformer_resident) <= len(small[0].transformer_resident), gigabytes
            # A larger image never gets a faster first plan.
            assert seconds(large[0], *large_size) >= seconds(small[0], *small_size), gigabytes


def test_first_rung_keeps_no_more_blocks_for_a_larger_image_or_a_smaller_budget() -> None:
    """Like with like: the same rung keeps no more blocks for a larger image or a smaller budget, and the
    first plan is never predicted faster."""
    # At 6 GB, 1536x1536 leads with "stream" keeping 0 blocks (3.276 s, its 0.323 s steps hide every
    # copy) ahead of "stream_tiled" keeping 8 (3.476 s); 2048x2048 only fits "stream_tiled", keeping 6
    # (6.063 s). So the first rungs differ and the larger image's keeps more: compare the tiled rungs.
    small, large = ladder(6, 1536, 1536), ladder(6, 2048, 2048)
    assert [small[0].rung, large[0].rung] == ["stream", "stream_tiled"]
    small_tiled, large_tiled = first_of(small, "stream_tiled"), first_of(large, "stream_tiled")
    assert (len(small_tiled.transformer_resident), len(large_tiled.transformer_resident)) == (8, 6)
    assert seconds(large[0], 2048, 2048) >= seconds(small[0], 1536, 1536)
    # At 5 and 4.5 GB, 1536x1536 leads with "stream_tiled", keeping 6 and 5 blocks (3.476 s both:
    # compute-bound either way).
    roomier, tighter = ladder(5, 1536, 1536)[0], ladder(4.5, 1536, 1536)[0]
    assert roomier.rung == tighter.rung == "stream_tiled"
    assert len(tighter.transformer_resident) < len(roomier.transformer_resident)
    assert seconds(tighter, 1536, 1536) >= seconds(roomier, 1536, 1536)


def test_all_resident_with_tiled_decode_is_offered_when_it_fits() -> None:
    """When every block fits resident only with a tiled decode, the ladder offers that placement."""
    assert fits(expected_peak(1536, 1536, resident=BLOCKS, te_streamed=True, tiled=True), 16)
    assert any(len(p.transformer_resident) == BLOCKS and p.vae_tiled for p in ladder(16, 1536, 1536))
    # A bigger budget must not offer less.
    tighter = most_resident(ladder(14.5, 2048, 2048), plain_decode=False)
    assert most_resident(ladder(14.75, 2048, 2048), plain_decode=False) >= tighter


# host memory


def test_pin_host_only_when_the_host_budget_holds_the_streamed_weights() -> None:
    """A plan pins host memory only if the streamed weights fit the pinned host budget."""
    # 8 GB at 1024x1024 leads with stream_tiled keeping 15 blocks: it pins the other 19 blocks and all
    # 36 encoder layers, 15_075_335_168 bytes, and is predicted at 1.628 s.
    roomy = ladder(8)[0]
    assert roomy.rung == "stream_tiled" and len(roomy.transformer_resident) == 15 and roomy.pin_host
    assert roomy.pinned_host_bytes == 19 * BLOCK + LAYERS * LAYER == 15_075_335_168
    # One byte short: the same placement, copied from pageable memory at 8 GB/s (0.918 s a step, 9.416 s);
    # the full decode keeps fewer blocks and pages too (10.197 s), so the tiled rung still leads.
    tight = ladder(8, host=roomy.pinned_host_bytes - 1)[0]
    assert tight.rung == "stream_tiled"
    assert tight.transformer_resident == roomy.transformer_resident
    assert tight.pinned_host_bytes == roomy.pinned_host_bytes
    assert not tight.pin_host
    assert "pageable host memory" in tight.describe()
    assert seconds(tight) == pytest.approx(9.4161, abs=1e-4) and seconds(roomy) == pytest.approx(
        1.6281, abs=1e-4
    )
    # Exactly enough pins the tiled rung; the full decode streams 2 more blocks, so it still pages.
    exact = ladder(8, host=roomy.pinned_host_bytes)
    assert exact[0].pin_host
    assert exact[1].rung == "stream" and not exact[1].pin_host


def test_nothing_streamed_needs_no_pinned_memory() -> None:
    """An all-resident plan pins nothing, so even a zero host budget leaves pin_host on."""
    first = ladder(40, host=0)[0]
    assert first.pinned_host_bytes == 0 and first.pin_host
    te_streamed = ladder(16, host=0)[0]
    assert te_streamed.pinned_host_bytes == LAYERS * LAYER and not te_streamed.pin_host


# spreading streamed blocks


@pytest.mark.parametrize("total", [1, 2, 3, 4, 7, 10, 34, 40])
def test_spread_resident_keeps_exactly_the_asked_count(total: int) -> None:
    """Every resident count from none to all gives that many distinct in-range indices."""
    for resident in range(total + 1):
        chosen = spread_resident(total, resident)
        assert len(chosen) == resident
        assert chosen <= frozenset(range(total))


@pytest.mark.parametrize("total", [2, 4, 10, 34])
def test_spread_resident_never_puts_two_streamed_blocks_side_by_side(total: int) -> None:
    """With at most half the blocks streamed, each streamed block sits between resident ones."""
    for streamed in range(1, total // 2 + 1):
        gone = sorted(frozenset(range(total)) - spread_resident(total, total - streamed))
        assert len(gone) == streamed
        assert all(b - a >= 2 for a, b in itertools.pairwise(gone)), (total, streamed, gone)


def test_spread_resident_edge_cases() -> None:
    """None resident streams all; all (or more) resident streams none; an empty stack is empty."""
    assert spread_resident(34, 0) == frozenset()
    assert spread_resident(34, 34) == frozenset(range(34))
    assert spread_resident(34, 40) == frozenset(range(34))
    assert spread_resident(0, 0) == frozenset()
    assert spread_resident(4, 2) == frozenset({0, 2})


def test_ladder_spreads_its_streamed_blocks() -> None:
    """The planner's stream rung uses spread_resident, so streamed blocks are spaced through the stack."""
    plan = ladder(12)[0]
    assert plan.transformer_resident == spread_resident(BLOCKS, len(plan.transformer_resident))


# calibration


def record(weights: float, predicted: float, measured: float) -> tuple[int, int, int]:
    """A past job's resident weights, predicted peak and measured peak, given in GB."""
    return int(weights * GB), int(predicted * GB), int(measured * GB)


def test_calibrated_scale_is_the_ratio_of_measured_to_predicted_transients() -> None:
    """A transient 20% over its prediction scales activations by 1.2 (the weights are not scaled)."""
    assert calibrated_scale([record(10, 12, 12.4)]) == pytest.approx(1.2)


def test_calibrated_scale_takes_the_worst_job() -> None:
    """Several jobs: the largest overrun wins, so the estimate stays safe for all of them."""
    records = [record(10, 12, 12.2), record(4, 6, 6.6), record(2, 3, 3)]
    assert calibrated_scale(records) == pytest.approx(1.3)


def test_calibrated_scale_is_clamped() -> None:
    """Ratios are kept within [0.8, 2.0]."""
    assert calibrated_scale([record(10, 12, 10.2)]) == pytest.approx(0.8)
    assert calibrated_scale([record(10, 12, 20)]) == pytest.approx(2.0)


def test_calibrated_scale_without_usable_records_is_one() -> None:
    """No records, plans without weights or prediction, or peaks below the weights change nothing."""
    assert calibrated_scale([]) == 1.0
    assert calibrated_scale([record(0, 0, 5)]) == 1.0
    assert calibrated_scale([record(10, 12, 9)]) == 1.0
    assert calibrated_scale([record(12, 12, 13)]) == 1.0


# diffusers' own modes


def test_diffusers_plan_none_keeps_everything_on_the_device() -> None:
    """'none' predicts every weight plus the largest phase."""
    plan = diffusers_plan("none", ZIMAGE, ACTS, 1024, 1024)
    weights = ZIMAGE.transformer + ZIMAGE.text_encoder + ZIMAGE.vae
    transient = max(ACTS.encode(), ACTS.denoise(1024, 1024), ACTS.decode(1024, 1024))
    assert plan.rung == "none"
    assert plan.transformer_resident == frozenset(range(BLOCKS)) and not plan.text_encoder_streamed
    assert (plan.resident_weight_bytes, plan.predicted_peak_bytes) == (weights, weights + transient)


def test_diffusers_plan_model_holds_the_largest_component() -> None:
    """'model' offload keeps one component at a time: the transformer is the largest."""
    plan = diffusers_plan("model", ZIMAGE, ACTS, 1024, 1024)
    assert plan.rung == "model" and plan.text_encoder_streamed
    assert plan.transformer_resident == frozenset()
    assert plan.resident_weight_bytes == ZIMAGE.transformer


def test_diffusers_plan_group_holds_the_rest_and_two_blocks() -> None:
    """'group' offload keeps the non-block weights and one block group in flight beside the computing one."""
    plan = diffusers_plan("group", ZIMAGE, ACTS, 1024, 1024)
    rest = ZIMAGE.transformer_rest + ZIMAGE.text_encoder_rest + ZIMAGE.vae
    assert plan.rung == "group"
    assert plan.resident_weight_bytes == rest + 2 * BLOCK


def test_diffusers_plan_sequential_is_the_ladders_last_rung() -> None:
    """'sequential' is the same plan the planner's ladder ends with: one leaf at a time, tiled decode."""
    plan = diffusers_plan("sequential", ZIMAGE, ACTS, 1024, 1024)
    assert plan == ladder(12)[-1]
    assert plan.vae_tiled and not plan.pin_host
    assert plan.predicted_peak_bytes == BLOCK + ACTS.decode(1024, 1024, tiled=True) + ACTS.denoise(1024, 1024)


def test_diffusers_modes_need_less_memory_in_order() -> None:
    """none > model > group > sequential in predicted peak, and all know the stack's block count."""
    plans = [
        diffusers_plan(mode, ZIMAGE, ACTS, 1024, 1024) for mode in ("none", "model", "group", "sequential")
    ]
    peaks = [p.predicted_peak_bytes for p in plans]
    assert peaks == sorted(peaks, reverse=True) and len(set(peaks)) == 4
    assert {p.transformer_blocks_total for p in plans} == {BLOCKS}


# what a plan reports


def test_plan_record_keys_and_values() -> None:
    """record() keeps what the stats and calibration need, counts rather than index sets."""
    plan = ladder(8)[0]
    stored = plan.record()
    assert set(stored) == {
        "rung",
        "description",
        "transformer_resident",
        "transformer_blocks",
        "text_encoder_streamed",
        "vae_tiled",
        "predicted_peak_bytes",
        "resident_weight_bytes",
        "pinned_host_bytes",
        "streamed_bytes_per_step",
    }
    assert stored["streamed_bytes_per_step"] == (BLOCKS - 15) * BLOCK
    # 8 GB at 1024x1024: stream_tiled keeping 15 blocks. Weights 6_098_853_550 bytes (5.68 GB: the
    # transformer's rest, 15 blocks, the VAE, the encoder's rest), peak 7_766_744_967 (7.23 GB: the
    # denoise phase, 0.47 GB of activations plus 3 blocks in flight, is the largest), pinned 15_075_335_168.
    assert stored["rung"] == "stream_tiled"
    assert stored["description"] == plan.describe()
    assert stored["transformer_resident"] == 15
    assert stored["transformer_blocks"] == BLOCKS
    assert stored["text_encoder_streamed"] is True and stored["vae_tiled"] is True
    weights = ZIMAGE.transformer_rest + 15 * BLOCK + ZIMAGE.vae + ZIMAGE.text_encoder_rest
    assert stored["resident_weight_bytes"] == weights == 6_098_853_550
    peak = expected_peak(1024, 1024, resident=15, te_streamed=True, tiled=True)
    assert stored["predicted_peak_bytes"] == peak == 7_766_744_967
    assert stored["pinned_host_bytes"] == 19 * BLOCK + LAYERS * LAYER == 15_075_335_168


def test_plan_describe() -> None:
    """describe() names the rung, the resident count and where the encoder and decode run."""
    assert ladder(12)[0].describe() == "stream, transformer 23/34 resident, text encoder streamed, vae full"
    assert (
        ladder(8)[0].describe()
        == "stream_tiled, transformer 15/34 resident, text encoder streamed, vae tiled"
    )
    assert ladder(40)[0].describe() == "resident, transformer 34/34 resident, text encoder resident, vae full"
    tiled = ladder(6, 2048, 2048)[0]
    assert tiled.describe() == "stream_tiled, transformer 6/34 resident, text encoder streamed, vae tiled"
    # Only the planner's own rungs mention pageable memory; sequential never pins.
    sequential = ladder(8)[-1]
    assert not sequential.pin_host
    assert sequential.describe() == "sequential, transformer 0/34 resident, text encoder streamed, vae tiled"


def test_plan_short() -> None:
    """short() is the rung, the resident count and a tiled flag for the planner's rungs."""
    assert ladder(8)[0].short() == "stream_tiled 15/34 tiled"
    assert ladder(12)[0].short() == "stream 23/34"
    assert ladder(40)[0].short() == "resident 34/34"
    assert ladder(8)[-1].short() == "sequential 0/34"
