"""SIGKILL the flow process while pretraining runs, resume: finished stages are not recomputed,
the interrupted stage continues from its last checkpoint (same identity directory) and ends exactly where an
uninterrupted run ends; ``status`` of a killed run says what was interrupted."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipeline.conftest import DEMO_CONFIG, REPO_ROOT, read_json, tiny_overrides


def _cli(args: list[str], env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dinov2_pipeline.cli", *args], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _complete_checkpoints(stage_root: str) -> list[str]:
    """Complete checkpoints of any identity of the stage (``<stage_root>/<identity>/checkpoints/<iteration>``)."""
    return sorted(p for p in glob.glob(os.path.join(stage_root, "*", "checkpoints", "*"))
                  if os.path.exists(os.path.join(p, ".complete")))


@pytest.mark.slow
def test_kill_during_training_then_resume(tmp_path, image_set, prefect_server_url):
    import torch

    from tasks.record import current_dir, identity_dirs

    work_dir = tmp_path / "run"
    overrides = tiny_overrides(
        work_dir, image_set,
        *[f"{s}.enabled=false" for s in ("embed", "dedup", "curate", "highres", "distill", "eval", "report")],
        "pretrain.overrides=[optim.epochs=4, checkpoint.period=2]",
        "launcher.poll_interval_s=0.5", epochs=1,
    )
    # PWD as a shell started in the repository sets it: the recipe paths below it must survive secret redaction
    env = dict(os.environ, PREFECT_API_URL=prefect_server_url, OMP_NUM_THREADS="1", PWD=str(REPO_ROOT))
    log = open(tmp_path / "flow.log", "wb")
    flow = _cli(["run", str(DEMO_CONFIG), *overrides], env, log)
    pretrain_root = os.path.join(work_dir, "pretrain")
    deadline = time.time() + 240
    while time.time() < deadline and not _complete_checkpoints(pretrain_root):
        assert flow.poll() is None, open(tmp_path / "flow.log").read()[-3000:]
        time.sleep(0.3)
    assert _complete_checkpoints(pretrain_root), "pretrain never wrote a checkpoint"
    flow.send_signal(signal.SIGKILL)
    flow.wait()
    [pretrain] = identity_dirs(pretrain_root)
    assert not os.path.exists(os.path.join(pretrain, "_SUCCESS.json")) and current_dir(pretrain_root) is None
    ingest_record = os.path.join(current_dir(os.path.join(work_dir, "ingest")), "_SUCCESS.json")
    ingest_done = os.path.getmtime(ingest_record)

    resumed = _cli(["resume", str(work_dir)], env, log)
    assert resumed.wait(timeout=300) == 0, open(tmp_path / "flow.log").read()[-3000:]

    assert os.path.getmtime(ingest_record) == ingest_done
    assert identity_dirs(pretrain_root) == [pretrain] and current_dir(pretrain_root) == pretrain  # same identity
    stages = read_json(work_dir, "_run.json")["runs"][-1]["stages"]
    assert stages["ingest"]["outcome"] == "reused" and stages["pretrain"]["outcome"] == "recomputed"
    assert len(glob.glob(os.path.join(pretrain, "jobs", "*_submitted.pkl"))) == 2  # killed + resumed
    rows = [json.loads(line) for line in open(os.path.join(pretrain, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows] == list(range(17))  # iterations 0..epochs*4 inclusive
    job_id = read_json(pretrain, "_state.json")["job"]["job_id"]
    assert "resumed from" in open(os.path.join(pretrain, "jobs", f"{job_id}_0_log.err")).read()

    # An uninterrupted run of the same stage config ends with the same weights.
    from dinov2_core.train import run_training
    from dinov2_core.train.config import TrainConfig
    from dinov2_core.utils.config import from_dict

    config = read_json(pretrain, "_SUCCESS.json")["config"]
    reference = run_training(from_dict(TrainConfig, config), tmp_path / "reference")
    got = torch.load(os.path.join(pretrain, "export", "backbone.pth"), map_location="cpu")
    want = torch.load(os.path.join(reference["export_dir"], "backbone.pth"), map_location="cpu")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


KILLED_DURING_INGEST = """
import os, signal, sys
from dinov2_core.utils.config import from_dict
from tasks.config import PipelineConfig
from tasks.pipeline_run import start_run

off = {"enabled": False}
cfg = from_dict(PipelineConfig, {"source": sys.argv[1], "work_dir": sys.argv[2], "tracking": off,
                                 "pretrain": off, "highres": off, "distill": off})
ctx = start_run(cfg)
ctx.record("ingest", outcome="running", reason="first run of this stage", identity="a" * 64)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_status_of_a_killed_run_says_interrupted(tmp_path):
    from tasks.pipeline_run import run_status

    work_dir = tmp_path / "run"
    flow = subprocess.run([sys.executable, "-c", KILLED_DURING_INGEST, str(tmp_path), str(work_dir)], cwd=REPO_ROOT)
    assert flow.returncode == -signal.SIGKILL
    assert run_status(str(work_dir))["stages"]["ingest"]["status"] == "interrupted"
