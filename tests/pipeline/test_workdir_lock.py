"""One writer per run directory: two real ``dinov2-pipeline run`` processes on one work_dir, started
together and one after the other. The second refuses with a clear message and touches nothing: the first
finishes, its training job is never killed, and the run directory (mlflow.db included) stays usable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.pipeline.conftest import DEMO_CONFIG, REPO_ROOT, tiny_overrides

ONLY_PRETRAIN = [f"{s}.enabled=false" for s in ("ingest", "embed", "dedup", "curate", "highres", "distill", "eval",
                                                 "report")]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from tasks.workdir_lock import WorkDirLock, WorkDirLocked

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from tasks.workdir_lock import WorkDirLock\n"
                               f"WorkDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkDirLocked, match=f"pid {holder.pid}"):
            WorkDirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = WorkDirLock(str(tmp_path)).acquire()  # the holder died: its lock is stale
    assert lock.held_by_me() and json.load(open(tmp_path / ".lock"))["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def _run(work_dir, image_set, tmp_path, name: str, *extra: str) -> subprocess.Popen:
    overrides = tiny_overrides(work_dir, image_set, f"source={image_set['train_manifest']}", *ONLY_PRETRAIN,
                               "launcher.local_mode=subprocess", "launcher.poll_interval_s=0.5", *extra)
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / f"prefect-{name}"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dinov2_pipeline", "run", str(DEMO_CONFIG), *overrides],
                            cwd=REPO_ROOT, env=env, stdout=open(tmp_path / f"{name}.out", "w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_runs_on_one_work_dir(tmp_path, image_set):
    work_dir = tmp_path / "run"
    first, second = _run(work_dir, image_set, tmp_path, "a"), _run(work_dir, image_set, tmp_path, "b")
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    logs = (tmp_path / "a.out").read_text() + (tmp_path / "b.out").read_text()
    assert codes == [0, 3], logs
    assert "is in use by another run" in logs and "Traceback" not in logs

    # started later, while the first one trains: refused, and the first one's job keeps running to the end
    longer = "pretrain.overrides=[optim.epochs=12, optim.warmup_epochs=0, teacher.warmup_teacher_temp_epochs=0]"
    third = _run(work_dir, image_set, tmp_path, "c", longer)
    deadline = time.time() + 300
    running = None
    while time.time() < deadline and running is None:
        runs = (json.load(open(work_dir / "_run.json")) if (work_dir / "_run.json").exists() else {}).get("runs", [])
        stage = (runs[-1].get("stages") or {}).get("pretrain", {}) if len(runs) >= 2 else {}
        if stage.get("outcome") == "running":
            state_file = work_dir / "pretrain" / stage["identity"][:16] / "_state.json"
            job = json.load(open(state_file)).get("job") if state_file.exists() else None
            running = job if job and job.get("kind") == "local" else None
        time.sleep(0.5)
    assert running, (tmp_path / "c.out").read_text()
    fourth = _run(work_dir, image_set, tmp_path, "d", longer)
    assert fourth.wait(timeout=600) == 3
    assert os.path.exists(f"/proc/{running['job_id']}"), "the refused run killed the live run's training job"
    assert third.wait(timeout=600) == 0, (tmp_path / "c.out").read_text()
    # the run directory is intact: a resume on it works and reuses everything
    fifth = subprocess.run([sys.executable, "-m", "dinov2_pipeline", "resume", str(work_dir)], cwd=REPO_ROOT,
                           env=dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-e")), capture_output=True,
                           text=True, timeout=600)
    assert fifth.returncode == 0, fifth.stdout + fifth.stderr
    assert "pretrain  reused" in fifth.stdout
