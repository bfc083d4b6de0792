"""Per-step metrics: ``metrics.jsonl`` (one JSON object per iteration), a callback and a progress bar.

Only rank 0 writes. On resume the lines for iterations that are re-run (those after the checkpoint)
are dropped first, so the file always describes one consistent run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

from dinov2_core.utils.atomic import atomic_write_text

MetricsCallback = Callable[[dict[str, Any]], None]


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLogger:
    def __init__(self, output_dir: str | os.PathLike, enabled: bool, total_iterations: int,
                 start_iteration: int = 0, callback: MetricsCallback | None = None) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.callback = callback
        self.last: dict[str, Any] = {}
        self._bar = None
        if not enabled:
            return
        self._truncate_from(start_iteration)
        self._handle = self.path.open("a", encoding="utf-8")
        if sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # dinov2_core does not require tqdm; the bar is a convenience
                return
            self._bar = tqdm(total=total_iterations, initial=start_iteration, unit="it", dynamic_ncols=True)

    def _truncate_from(self, start_iteration: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("iteration", -1) < start_iteration:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def rewind(self, iteration: int) -> None:
        """Forget the lines of iterations >= ``iteration`` (they are about to be re-run after a restore)."""
        if not self.enabled:
            return
        self._handle.close()
        self._truncate_from(iteration)
        self._handle = self.path.open("a", encoding="utf-8")
        if self._bar is not None:
            self._bar.n = iteration
            self._bar.refresh()

    def log(self, record: dict[str, Any]) -> None:
        self.last = record
        if not self.enabled:
            return
        self._handle.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self._handle.flush()
        if self.callback is not None:
            self.callback(dict(record))
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record.get('total_loss', float('nan')):.4f}", lr=f"{record.get('lr', 0):.2e}")

    def close(self) -> None:
        if self.enabled:
            self._handle.close()
            if self._bar is not None:
                self._bar.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
