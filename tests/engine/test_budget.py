"""The VRAM budget settings on the CPU: parsing, resolving to bytes, and the (absent) allocator cap."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest
import torch

from worker.engine import budget as budget_module
from worker.engine.budget import AUTO_HOST_RESERVE, apply_device_cap, parse_gigabytes, resolve_budget
from worker.engine.costs import GB, Budget

CPU = torch.device("cpu")
CPU_DEVICE_BYTES = 1 << 62


def fake_available(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    """Make psutil report this much available host memory to budget.py."""
    monkeypatch.setattr(budget_module.psutil, "virtual_memory", lambda: SimpleNamespace(available=available))


# parse_gigabytes


@pytest.mark.parametrize("text", ["auto", "AUTO", " Auto "])
def test_parse_auto_is_none(text: str) -> None:
    """'auto', in any case and with spaces around it, means: work it out from free memory."""
    assert parse_gigabytes(text) is None


@pytest.mark.parametrize(("text", "expected"), [("12", 12.0), ("1.5", 1.5), (" 24 ", 24.0), ("0.25", 0.25)])
def test_parse_positive_numbers(text: str, expected: float) -> None:
    """A positive number is gigabytes, as a float."""
    value = parse_gigabytes(text)
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize("text", ["0", "-1", "-0.5", "abc", "", "12GB"])
def test_parse_rejects_non_positive_and_non_numbers(text: str) -> None:
    """Zero, negatives and anything that is not a number are errors, not a silent default."""
    with pytest.raises(ValueError):
        parse_gigabytes(text)


# resolve_budget on the CPU


def test_explicit_budgets_are_exact_bytes() -> None:
    """Explicit settings become exactly that many bytes, whatever the machine has."""
    resolved = resolve_budget("12", "1.5", CPU)
    assert resolved == Budget(device_bytes=12 * GB, host_pinned_bytes=int(1.5 * GB))


def test_auto_device_budget_on_the_cpu_is_huge(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU has no VRAM to cap: auto gives a budget nothing exceeds."""
    fake_available(monkeypatch, 32 * GB)
    resolved = resolve_budget("auto", "8", CPU)
    assert resolved.device_bytes == CPU_DEVICE_BYTES
    assert resolved.host_pinned_bytes == 8 * GB


def test_auto_host_budget_is_available_memory_minus_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto pins what is available now, less what the OS and other programs are left."""
    fake_available(monkeypatch, 32 * GB)
    resolved = resolve_budget("10", "auto", CPU)
    assert resolved.host_pinned_bytes == 32 * GB - AUTO_HOST_RESERVE == 28 * GB
    assert resolved.device_bytes == 10 * GB


@pytest.mark.parametrize("available", [0, 1, AUTO_HOST_RESERVE - 1, AUTO_HOST_RESERVE])
def test_auto_host_budget_is_never_negative(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    """With less available than the reserve, auto pins nothing rather than a negative amount."""
    fake_available(monkeypatch, available)
    assert resolve_budget("auto", "auto", CPU).host_pinned_bytes == 0


def test_auto_host_budget_on_this_machine() -> None:
    """Unpatched, auto stays within what the machine really has."""
    resolved = resolve_budget("auto", "auto", CPU)
    memory = psutil.virtual_memory()
    assert resolved.device_bytes == CPU_DEVICE_BYTES
    assert 0 <= resolved.host_pinned_bytes <= max(0, memory.total - AUTO_HOST_RESERVE)


def test_resolve_budget_rejects_bad_settings() -> None:
    """A bad setting fails while resolving, before anything is loaded."""
    with pytest.raises(ValueError):
        resolve_budget("0", "auto", CPU)
    with pytest.raises(ValueError):
        resolve_budget("auto", "lots", CPU)


# apply_device_cap


def test_apply_device_cap_on_the_cpu_sets_nothing() -> None:
    """The CPU has no caching allocator to cap: None, whatever the budget."""
    assert apply_device_cap(Budget(device_bytes=4 * GB, host_pinned_bytes=GB), CPU) is None
    assert apply_device_cap(resolve_budget("auto", "auto", CPU), CPU) is None
