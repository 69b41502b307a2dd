"""A row of the benchmark's table, and the table (markdown) that README.md shows."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MiB = 1 << 20
GiB = 1024 * MiB


@dataclass
class Row:
    workload: str
    unit: str
    mirror: float | None
    proxy: float | None = None
    reference: float | None = None  # nginx sendfile, direct from the upstream, one worker, ...
    reference_name: str = ""
    target: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def human_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB else f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def table(rows: list[Row]) -> str:
    lines = [
        "| workload | unit | mirror | Distribution proxy | reference | mirror ÷ proxy | mirror ÷ reference | target "
        "| met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.2f}"

    for r in rows:
        vs_proxy = f"{r.mirror / r.proxy:.2f}x" if r.proxy and r.mirror is not None else ""
        vs_ref = f"{r.mirror / r.reference:.2f}x ({r.reference_name})" if r.reference and r.mirror is not None else ""
        met = "" if r.met is None else "yes" if r.met else "**no**"
        lines.append(f"| {r.workload} | {r.unit} | {num(r.mirror)} | {num(r.proxy)} | {num(r.reference)} | {vs_proxy} "
                     f"| {vs_ref} | {r.target} | {met} |")  # fmt: skip
    return "\n".join(lines)
