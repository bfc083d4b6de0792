"""A CPU run killed with SIGKILL and resumed logs exactly the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dinov2_core.train.metrics import read_metrics

TINY = "configs/train/tiny_pretrain.yaml"
REPO = Path(__file__).resolve().parents[2]


def _command(output: Path, manifest: str) -> list[str]:
    return [sys.executable, "-m", "dinov2_pipeline", "train", TINY, "--output-dir", str(output),
            f"train.dataset={manifest}", "optim.epochs=3", "checkpoint.period=3"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _last_iteration(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.exists():
        return -1
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])["iteration"] if lines else -1
    except json.JSONDecodeError:
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(tiny_dataset, tmp_path):
    manifest = tiny_dataset.manifest_uri
    reference = tmp_path / "reference"
    subprocess.run(_command(reference, manifest), check=True, cwd=REPO, env=_env(), capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(killed, manifest), cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _last_iteration(killed) < 7 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _last_iteration(killed)
    assert 7 <= killed_at < 12
    complete = sorted(p.name for p in (killed / "checkpoints").iterdir() if (p / ".complete").exists())
    assert complete and int(complete[-1]) < killed_at
    # A checkpoint directory without its marker (killed while saving) must be ignored and removed.
    (killed / "checkpoints" / "00000011").mkdir()

    subprocess.run(_command(killed, manifest), check=True, cwd=REPO, env=_env(), capture_output=True)
    assert not (killed / "checkpoints" / "00000011").exists() or (killed / "checkpoints" / "00000011" / ".complete").exists()
    expected, resumed = read_metrics(reference), read_metrics(killed)
    assert [r["iteration"] for r in resumed] == list(range(13))
    for want, got in zip(expected, resumed):
        for key in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr"):
            assert got[key] == want[key], (want["iteration"], key, want[key], got[key])
