"""Shared plumbing for benchmarks: machine description and result recording.

Every benchmark writes ``bench/results/<name>.json`` and appends a section to ``bench/RESULTS.md``
with the date, the machine, the exact command and the numbers, so every figure can be reproduced.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_DIR = BENCH_DIR / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, accelerator and library versions of this machine."""
    info: dict[str, Any] = {
        "hostname_kind": platform.machine(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            kb = int(handle.readline().split()[1])
            info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def command_line() -> str:
    """The command that reproduces this run, from the repository root."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # started with ``python -m bench.<name>``
        head = ["python", "-m", spec.name]
    else:
        head = ["python", os.path.relpath(sys.argv[0], BENCH_DIR.parent)]
    return " ".join(shlex.quote(a) for a in [*head, *sys.argv[1:]])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def record(name: str, results: dict[str, Any], notes: str = "") -> Path:
    """Write ``results`` for benchmark ``name`` (JSON + a Markdown section in RESULTS.md)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"name": name, "date": now, "command": command_line(), "machine": machine(), "results": results}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mach = payload["machine"]
    where = mach.get("gpu") or f"{mach.get('cpu', 'unknown CPU')}, {mach.get('cores')} cores"
    lines = [f"\n## {name} — {now}\n", f"- machine: {where}; torch {mach.get('torch')}\n",
             f"- command: `{payload['command']}`\n"]
    if notes:
        lines.append(f"- notes: {notes}\n")
    rows = results.get("rows") if isinstance(results.get("rows"), list) else None
    if rows:
        keys = list(rows[0].keys())
        lines.append("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |\n")
    scalars = {k: v for k, v in results.items() if k != "rows"}
    for key, value in scalars.items():
        lines.append(f"- {key}: {_fmt(value)}\n")
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text("# Benchmark results\n\nAppended by the scripts in `bench/`; newest last.\n")
    with RESULTS_MD.open("a") as handle:
        handle.writelines(lines)
    return path
