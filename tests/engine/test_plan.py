"""The planner as pure arithmetic, on sizes shaped like Z-Image-Turbo in bf16 (no torch models)."""

from __future__ import annotations

import itertools

import pytest

from worker.engine.calibration import DEFAULT_ACTIVATIONS, DEFAULT_SPEED
from worker.engine.plan import (
    FRAGMENTATION_HEADROOM,
    GB,
    TEXT_ENCODER_LOOKAHEAD,
    TRANSFORMER_LOOKAHEAD,
    Budget,
    ModelSizes,
    Plan,
    calibrated_scale,
    diffusers_plan,
    plan_ladder,
    spread_resident,
    stream_buffers,
    usable,
    with_scale,
)

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
SPEED_ORDER = ("resident", "te_streamed", "stream", "stream_tiled", "sequential")
HOST = 64 * GB
SQUARE = [(1024, 1024), (1536, 1536), (2048, 2048)]
SIZES = [(512, 512), (768, 768), (1024, 1024), (1280, 720), (1280, 1280), (1536, 1536), (2048, 2048)]
BUDGETS_GB = [48, 40, 32, 24, 20, 16, 14, 12, 10, 8, 7, 6, 5, 4, 3, 2.5, 2, 1.5]


def budget(gigabytes: float, host: int = HOST) -> Budget:
    """A device budget of this many GB and plenty of pinned host memory unless told."""
    return Budget(device_bytes=int(gigabytes * GB), host_pinned_bytes=host)


def ladder(gigabytes: float, width: int = 1024, height: int = 1024, host: int = HOST) -> list[Plan]:
    """The Z-Image ladder at this budget and size."""
    return plan_ladder(ZIMAGE, ACTS, budget(gigabytes, host), width, height, speed=DEFAULT_SPEED)


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
        (12, 1024, "stream"),
        (8, 1024, "stream"),
        (6, 1024, "stream"),
        (6, 2048, "stream_tiled"),
        (2, 1536, "sequential"),
    ],
)
def test_first_rung_at_known_budgets(gigabytes: float, width: int, expected: str) -> None:
    """The first rung at budgets computed from the cost model by hand."""
    assert ladder(gigabytes, width, width)[0].rung == expected


@pytest.mark.parametrize(("width", "height"), [*SQUARE, (1280, 720)])
@pytest.mark.parametrize("gigabytes", BUDGETS_GB)
def test_first_plan_fits_and_no_faster_rung_would(gigabytes: float, width: int, height: int) -> None:
    """The first plan is the fastest that fits: it fits, and every faster placement would not."""
    first = ladder(gigabytes, width, height)[0]
    resident = len(first.transformer_resident)

    def peak(blocks: int, te_streamed: bool, tiled: bool) -> int:
        return expected_peak(width, height, resident=blocks, te_streamed=te_streamed, tiled=tiled)

    if first.rung != "sequential":
        assert first.predicted_peak_bytes == peak(resident, first.text_encoder_streamed, first.vae_tiled)
        assert fits(first.predicted_peak_bytes, gigabytes)
    if first.rung != "resident":
        assert not fits(peak(BLOCKS, False, False), gigabytes)
    if first.rung in ("stream", "stream_tiled", "sequential"):
        assert not fits(peak(BLOCKS, True, False), gigabytes)
    if first.rung == "stream":
        assert not fits(peak(resident + 1, True, False), gigabytes)
    if first.rung in ("stream_tiled", "sequential"):
        assert not fits(peak(0, True, False), gigabytes)  # no plain decode fits, however much streams
    if first.rung == "stream_tiled" and resident < BLOCKS:
        assert not fits(peak(resident + 1, True, True), gigabytes)
    if first.rung == "sequential":
        assert not fits(peak(0, True, True), gigabytes)


def test_stream_keeps_fewer_blocks_resident_as_the_budget_shrinks() -> None:
    """At 12, 8 and 6 GB the first rung streams, keeping strictly fewer blocks each time."""
    firsts = [ladder(gigabytes)[0] for gigabytes in (12, 8, 6)]
    assert [p.rung for p in firsts] == ["stream"] * 3
    counts = [len(p.transformer_resident) for p in firsts]
    assert BLOCKS > counts[0] > counts[1] > counts[2] > 0
    assert all(p.text_encoder_streamed and not p.vae_tiled for p in firsts)


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
    """Rungs never get faster down the ladder, and every plan is one of the planner's rungs."""
    for gigabytes in BUDGETS_GB:
        rungs = [p.rung for p in ladder(gigabytes, width, height)]
        order = [SPEED_ORDER.index(rung) for rung in rungs]
        assert order == sorted(order), (gigabytes, rungs)
        assert all(rungs.count(rung) == 1 for rung in set(rungs) - {"stream_tiled"}), rungs


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
        ladders = [ladder(gigabytes, w, h) for w, h in areas]
        for small, large in itertools.combinations(ladders, 2):
            for plain_decode in (False, True):
                smaller_count = most_resident(small, plain_decode=plain_decode)
                assert most_resident(large, plain_decode=plain_decode) <= smaller_count, gigabytes
            if small[0].rung == large[0].rung:
                assert len(large[0].transformer_resident) <= len(small[0].transformer_resident), gigabytes


def test_first_rung_keeps_no_more_blocks_for_a_larger_image_or_a_smaller_budget() -> None:
    """The first rung's resident count shrinks with a larger image and with a smaller budget."""
    small, large = ladder(6, 1536, 1536)[0], ladder(6, 2048, 2048)[0]
    assert len(large.transformer_resident) <= len(small.transformer_resident)
    roomier, tighter = ladder(5, 1536, 1536)[0], ladder(4.5, 1536, 1536)[0]
    assert len(tighter.transformer_resident) <= len(roomier.transformer_resident)


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
    roomy = ladder(8)[0]
    assert roomy.rung == "stream" and roomy.pin_host
    tight = ladder(8, host=roomy.pinned_host_bytes - 1)[0]
    assert tight.transformer_resident == roomy.transformer_resident
    assert tight.pinned_host_bytes == roomy.pinned_host_bytes
    assert not tight.pin_host
    assert "pageable host memory" in tight.describe()
    exact = ladder(8, host=roomy.pinned_host_bytes)[0]
    assert exact.pin_host


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


def record(weights: float, predicted: float) -> dict[str, object]:
    """A stored plan with these resident weights and predicted peak, in GB."""
    return {"resident_weight_bytes": int(weights * GB), "predicted_peak_bytes": int(predicted * GB)}


def test_calibrated_scale_is_the_ratio_of_measured_to_predicted_transients() -> None:
    """A transient 20% over its prediction scales activations by 1.2 (the weights are not scaled)."""
    assert calibrated_scale([(record(10, 12), int(12.4 * GB))]) == pytest.approx(1.2)


def test_calibrated_scale_takes_the_worst_job() -> None:
    """Several jobs: the largest overrun wins, so the estimate stays safe for all of them."""
    records = [(record(10, 12), int(12.2 * GB)), (record(4, 6), int(6.6 * GB)), (record(2, 3), 3 * GB)]
    assert calibrated_scale(records) == pytest.approx(1.3)


def test_calibrated_scale_is_clamped() -> None:
    """Ratios are kept within [0.8, 2.0]."""
    assert calibrated_scale([(record(10, 12), int(10.2 * GB))]) == pytest.approx(0.8)
    assert calibrated_scale([(record(10, 12), 20 * GB)]) == pytest.approx(2.0)


def test_calibrated_scale_without_usable_records_is_one() -> None:
    """No records, old plans without the fields, or peaks below the weights leave the estimate alone."""
    assert calibrated_scale([]) == 1.0
    assert calibrated_scale([({"rung": "none"}, 5 * GB)]) == 1.0
    assert calibrated_scale([(record(10, 12), 9 * GB)]) == 1.0
    assert calibrated_scale([(record(12, 12), 13 * GB)]) == 1.0


def test_calibrated_scale_reads_back_a_plans_record() -> None:
    """The keys Plan.record() stores are the ones calibration reads."""
    plan = ladder(8)[0]
    transient = plan.predicted_peak_bytes - plan.resident_weight_bytes
    measured = plan.resident_weight_bytes + int(transient * 1.5)
    assert calibrated_scale([(plan.record(), measured)]) == pytest.approx(1.5, rel=1e-6)


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
    }
    assert stored["rung"] == "stream"
    assert stored["description"] == plan.describe()
    assert stored["transformer_resident"] == len(plan.transformer_resident)
    assert stored["transformer_blocks"] == BLOCKS
    assert stored["predicted_peak_bytes"] == plan.predicted_peak_bytes
    assert 0 < plan.resident_weight_bytes < plan.predicted_peak_bytes


def test_plan_describe() -> None:
    """describe() names the rung, the resident count and where the encoder and decode run."""
    plan = ladder(8)[0]
    resident = len(plan.transformer_resident)
    assert plan.describe() == f"stream, transformer {resident}/34 resident, text encoder streamed, vae full"
    assert ladder(40)[0].describe() == "resident, transformer 34/34 resident, text encoder resident, vae full"
    tiled = ladder(6, 2048, 2048)[0]
    assert tiled.describe().endswith("text encoder streamed, vae tiled")
