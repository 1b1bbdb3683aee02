"""`nightrender profile` output: a rich table and a PNG chart of memory and speed per size and mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from cli.render_views import gigabytes


def profile_table(rows: list[dict[str, Any]]) -> Table:
    """One line per (mode, size): peaks, prediction, speed and whether it fit the budget."""
    table = Table(title="VRAM by resolution and mode (measured)")
    for header in ("mode", "size", "peak alloc", "peak reserved", "predicted", "s/image", "fits", "plan"):
        table.add_column(header, justify="left" if header in ("mode", "plan") else "right")
    for row in rows:
        seconds = row["seconds_per_image"]
        table.add_row(
            row["mode"],
            f"{row['width']}x{row['height']}",
            gigabytes(row["peak_allocated_bytes"]),
            gigabytes(row["peak_reserved_bytes"]),
            gigabytes(row["predicted_peak_bytes"]),
            "-" if seconds is None else f"{seconds:.3f}",
            "[green]yes[/green]" if row["fits"] else "[red]no[/red]",
            row["plan"] if not row.get("error") else row["error"],
        )
    return table


def profile_chart(rows: list[dict[str, Any]], path: Path, budget_bytes: int | None) -> Path:
    """Grouped bars: seconds per image and peak reserved GB per size, one colour per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["width"], r["height"]) for r in rows}, key=lambda s: s[0] * s[1])
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(modes))
    for index, mode in enumerate(modes):
        by_size = {(r["width"], r["height"]): r for r in rows if r["mode"] == mode}
        xs = [i + index * width for i in range(len(sizes))]
        speed.bar(xs, [_value(by_size.get(s), "seconds_per_image", 1) for s in sizes], width, label=mode)
        memory.bar(
            xs, [_value(by_size.get(s), "peak_reserved_bytes", 1024**3) for s in sizes], width, label=mode
        )
    for axis, label in ((speed, "seconds per image"), (memory, "peak reserved (GB)")):
        axis.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(sizes))])
        axis.set_xticklabels([f"{w}x{h}" for w, h in sizes])
        axis.set_ylabel(label)
        axis.legend()
    if budget_bytes:
        memory.axhline(budget_bytes / 1024**3, color="red", linestyle="--", label="budget")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _value(row: dict[str, Any] | None, key: str, scale: float) -> float:
    if row is None or row.get(key) is None:
        return 0.0
    return float(row[key]) / scale
