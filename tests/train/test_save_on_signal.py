"""Save on signal: SIGUSR2 / SIGTERM mid-run checkpoints the iteration in flight, then hands the signal on.

In process (CPU): the signal is sent to this process from the metrics callback at iteration k; without a
previous handler the run exits with status 75 after writing ``checkpoints/<k>``, and a rerun resumes at
k+1 with exactly the losses of an uninterrupted run. On the local Slurm cluster: a submitit job gets
``scancel --signal=USR2``, checkpoints, is requeued by submitit's handler and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dinov2_core.train import load_train_config, run_training
from dinov2_core.train.metrics import read_metrics
from dinov2_core.train.preemption import SAVED_ON_SIGNAL_EXIT_CODE, SavedOnSignalExit

TINY = "configs/train/tiny_pretrain.yaml"
LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr")


def _signal_at(iteration: int, signum: int):
    def callback(record: dict) -> None:
        if record["iteration"] == iteration:
            os.kill(os.getpid(), signum)
    return callback


def _complete(output: Path) -> list[int]:
    root = output / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if (p / ".complete").exists()) if root.is_dir() else []


def test_signal_saves_the_iteration_in_flight_and_resume_is_exact(tiny_dataset, pretrain_run, tmp_path):
    reference_dir, _ = pretrain_run  # the same tiny run, uninterrupted (12 iterations)
    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}"])
    output = tmp_path / "signalled"
    previous = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(SavedOnSignalExit) as stopped:
        run_training(cfg, output, metrics_callback=_signal_at(5, signal.SIGUSR2))
    assert stopped.value.code == SAVED_ON_SIGNAL_EXIT_CODE and stopped.value.iteration == 5
    assert signal.getsignal(signal.SIGUSR2) == previous, "the trainer's handler must be removed"
    assert 5 in _complete(output) and max(_complete(output)) == 5  # period 4 saved 3; the signal saved 5
    assert [r["iteration"] for r in read_metrics(output)] == list(range(6))

    summary = run_training(cfg, output)
    assert summary["iteration"] == 12
    expected, resumed = read_metrics(reference_dir), read_metrics(output)
    assert [r["iteration"] for r in resumed] == list(range(13))
    for want, got in zip(expected, resumed):
        for key in LOSSES:
            assert got[key] == want[key], (want["iteration"], key)


def test_previous_python_handler_gets_the_signal_after_the_checkpoint(tiny_dataset, tmp_path):
    """A launcher's handler (submitit's) runs once the checkpoint exists; if it returns, training goes on."""
    output = tmp_path / "handed_over"
    seen: list[tuple[int, list[int]]] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append((signum, _complete(output))))
    try:
        cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}", "optim.epochs=2"])
        summary = run_training(cfg, output, metrics_callback=_signal_at(2, signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [(signal.SIGTERM, [2])]
    assert summary["iteration"] == 8 and _complete(output) == [7, 8]


def test_unknown_signal_name_is_rejected():
    from dinov2_core.utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.save_on_signals: 'SIGNOPE'.*allowed: \["):
        load_train_config(TINY, ["train.dataset=x.txt", "checkpoint.save_on_signals=[SIGNOPE]"])


class SignalledTraining:
    """A submitit-callable training job: requeued through ``checkpoint()`` it resumes from its checkpoint."""

    def __init__(self, overrides: list[str], output: str) -> None:
        self.overrides = overrides
        self.output = output

    def __call__(self) -> dict:
        import logging

        logging.basicConfig(level=logging.INFO)  # "resumed from ..." goes to the job's stderr
        return run_training(load_train_config(TINY, self.overrides), self.output)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_slurm_usr2_checkpoints_requeues_and_resumes(tiny_dataset, slurm_cluster, tmp_path):
    import submitit

    output = tmp_path / "run"
    epochs = 40  # 160 iterations: the job is still training when the signal comes
    overrides = [f"train.dataset={tiny_dataset.manifest_uri}", f"optim.epochs={epochs}", "checkpoint.period=1000"]
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition=slurm_cluster.partition, cpus_per_task=1,
                               slurm_setup=["export OMP_NUM_THREADS=1"])
    job = executor.submit(SignalledTraining(overrides, str(output)))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        rows = read_metrics(output) if (output / "metrics.jsonl").exists() else []
        if rows and rows[-1]["iteration"] >= 5:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the job did not reach iteration 5: {job.stderr()}")
    logged_before_signal = rows[-1]["iteration"]
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=30)

    summary = job.result()
    assert summary["iteration"] == epochs * 4
    out, err = job.stdout(), job.stderr()
    assert out.count("Starting with JobEnvironment") >= 2, "submitit must have requeued the job"
    resumed = [line for line in err.splitlines() if "resumed from" in line]
    assert resumed, err[-2000:]
    saved_at = int(Path(resumed[0].split("resumed from ")[1].split()[0]).name)
    # The checkpoint is the iteration in flight when the signal landed (or one just after: the
    # handler runs between two steps), never an older periodic one.
    assert logged_before_signal <= saved_at < epochs * 4
    assert f"(next iteration {saved_at + 1})" in resumed[0]
    assert [r["iteration"] for r in read_metrics(output)] == list(range(epochs * 4 + 1))
    print(f"requeue loss: signal at iteration >= {logged_before_signal}, checkpoint {saved_at}, "
          f"resumed at {saved_at + 1}: 0 iterations redone")
