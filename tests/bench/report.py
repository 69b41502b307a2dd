"""The results as JSON (with the machine and the versions of everything compared) and as a markdown table."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any

from tests.bench.workloads import Plan
from tests.support.ops import REPO_ROOT


def _first_line(*argv: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unavailable ({exc})"
    return (proc.stdout + proc.stderr).strip().splitlines()[0] if (proc.stdout + proc.stderr).strip() else ""


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    commit = _first_line("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD")
    dirty = _first_line("git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no")
    return {
        "mirror": f"{commit}{' (modified)' if dirty else ''}",
        "python": sys.version.split()[0],
        "aiohttp": _package("aiohttp"),
        "uvloop": _package("uvloop"),
        "distribution": _first_line("docker-registry", "--version"),
        "nginx": _first_line("nginx", "-v"),
        "wrk": _first_line("wrk", "--version"),
        "skopeo": _first_line("skopeo", "--version"),
        "kernel": platform.release(),
    }


def machine() -> dict[str, Any]:
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "load_average_at_end": [float(x) for x in load],
    }


def document(plan: Plan, args: argparse.Namespace, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {
        "command": "python -m tests.bench"
        + (" --quick" if args.quick else "")
        + "".join(f" --mirror-flag={flag}" for flag in args.mirror_flag),
        "plan": plan.as_dict(),
        "machine": machine(),
        "versions": versions(),
        "seconds": round(seconds, 1),
        "workloads": results,
    }


def _num(value: float | None) -> str:
    if value is None or value != value:  # NaN
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a != a or b != b or b == 0:
        return ""
    return f"{a / b:.2f}x"


def table(doc: dict[str, Any]) -> str:
    lines = [
        "| workload | unit | mirror | Distribution proxy | reference | mirror / proxy | mirror / reference | target | met |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for rows in doc["workloads"].values():
        for r in rows:
            ref = f"{_num(r['ref'])} ({r['ref_name']})" if r.get("ref") is not None else ""
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            lines.append(
                f"| {r['name']} | {r['unit']} | {_num(r['mirror'])} | {_num(r['proxy'])} | {ref} | "
                f"{_ratio(r['mirror'], r['proxy'])} | {_ratio(r['mirror'], r['ref'])} | {r['target']} | {met} |"
            )
    cpu = [r for rows in doc["workloads"].values() for r in rows if r.get("cpu_s_per_gib")]
    if cpu:
        lines += [
            "",
            "| server CPU seconds per GiB sent | mirror | Distribution proxy | reference |",
            "|---|---:|---:|---:|",
        ]
        for r in cpu:
            c = r["cpu_s_per_gib"]
            lines.append(f"| {r['name']} | {_num(c.get('mirror'))} | {_num(c.get('proxy'))} | "
                         f"{_num(c.get(r['ref_name']))} ({r['ref_name']}) |")  # fmt: skip
    m = doc["machine"]
    v = doc["versions"]
    lines.append("")
    lines.append(
        f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB; load average at the end {m['load_average_at_end']}; "
        f"mirror {v['mirror']} on Python {v['python']}, aiohttp {v['aiohttp']}; {v['distribution']}; {v['nginx']}; "
        f"{v['wrk']}; {v['skopeo']}. Medians of {doc['plan']['rounds']} round(s) (herds: at most 3; memory: one run); `{doc['command']}`."
    )
    return "\n".join(lines)
