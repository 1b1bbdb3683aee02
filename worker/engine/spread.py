"""Which transformer blocks stream: an order whose every prefix is spread evenly through the stack."""

from __future__ import annotations


def stream_order(total: int) -> list[int]:
    """The order in which blocks leave the device as the budget shrinks.

    Every prefix is spread through the stack, so each copy hides behind compute; and the prefixes
    nest, so planning for a bigger size streams the same blocks plus a few more and a re-placement
    moves only those. Odd positions go first: up to half the stack streams with no two streamed
    blocks side by side.
    """
    return spread_order(list(range(1, total, 2))) + spread_order(list(range(0, total, 2)))


def spread_order(items: list[int]) -> list[int]:
    """The items in an order whose every prefix is spread evenly (van der Corput, from the middle)."""
    picked: list[int] = []
    for i in range(4 * len(items)):
        index = int(((van_der_corput(i) + 0.5) % 1.0) * len(items))
        if items[index] not in picked:
            picked.append(items[index])
    return picked + [item for item in items if item not in picked]


def van_der_corput(i: int) -> float:
    """The i-th point of the base-2 van der Corput sequence: 0, 1/2, 1/4, 3/4, 1/8, ..."""
    value, denominator = 0.0, 1.0
    while i:
        denominator *= 2
        value += (i & 1) / denominator
        i >>= 1
    return value


def spread_resident(total: int, resident: int) -> frozenset[int]:
    """Which blocks stay resident: all but the first `total - resident` of the stream order."""
    streamed = max(0, total - resident)
    return frozenset(range(total)) - frozenset(stream_order(total)[:streamed])
