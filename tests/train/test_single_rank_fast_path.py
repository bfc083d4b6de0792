"""One rank trains unwrapped (no FSDP2), with bf16 through autocast, and its checkpoints are interchangeable
with sharded runs: saved at 1 rank → resumed at 2 ranks → resumed at 1 rank, with the losses of an
uninterrupted run and identical checkpoint keys."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor

from dinov2_core.train import load_train_config, run_training
from dinov2_core.train.distributed import init_distributed, shutdown
from dinov2_core.train.metrics import read_metrics
from dinov2_core.train.preemption import SavedOnSignalExit
from dinov2_core.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/train/tiny_pretrain.yaml"
COMPARABLE = ["dino.koleo_loss_weight=0", "ibot.loss_weight=0", "ibot.mask_sample_probability=0",
              "student.drop_path_rate=0", "train.official_epoch_length=3", "optim.epochs=2",
              "checkpoint.period=3", "checkpoint.keep_last=3"]
LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss")


def test_one_rank_is_unwrapped_fused_and_trains_in_bf16(tiny_dataset, tmp_path):
    cfg = load_train_config(TINY, [f"train.dataset={tiny_dataset.manifest_uri}", "parallel.mixed_precision=bf16",
                                   "optim.epochs=1"])
    context = init_distributed("cpu")
    try:
        trainer = Trainer(cfg, tmp_path / "out", context)
        assert not any(isinstance(p, DTensor) for p in trainer.meta.parameters())
        assert trainer.optimizer.defaults["fused"] is True
        summary = trainer.fit()
    finally:
        shutdown(context)
    rows = read_metrics(tmp_path / "out")
    assert summary["iteration"] == 4 and all(math.isfinite(r["total_loss"]) for r in rows)


def _keys(checkpoint: Path) -> set[str]:
    return set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


@pytest.mark.slow
def test_checkpoints_move_between_one_rank_unwrapped_and_two_ranks_sharded(tiny_dataset, tmp_path):
    overrides = [f"train.dataset={tiny_dataset.manifest_uri}", *COMPARABLE]
    reference = tmp_path / "reference"
    run_training(load_train_config(TINY, overrides), reference)

    # 1 rank, unwrapped, stopped after iteration 3 (save on signal).
    moving = tmp_path / "moving"
    stop_at_3 = lambda record: record["iteration"] == 3 and os.kill(os.getpid(), signal.SIGUSR2)  # noqa: E731
    with pytest.raises(SavedOnSignalExit):
        run_training(load_train_config(TINY, overrides), moving, metrics_callback=stop_at_3)
    one_rank_keys = _keys(moving / "checkpoints" / "00000003")

    # 2 ranks, sharded, resume it and run to the end.
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dinov2_pipeline", "train", TINY, "--output-dir", str(moving), *overrides,
         "train.batch_size_per_gpu=4"],
        check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
    )
    two_rank_keys = _keys(moving / "checkpoints" / "00000005")
    model_keys = {k for k in one_rank_keys if k.startswith("model.")}
    assert model_keys and model_keys == {k for k in two_rank_keys if k.startswith("model.")}
    # FSDP2 reduces a zero gradient for the unused iBOT head (ibot.loss_weight=0), so AdamW keeps state for it
    # at 2 ranks; every state the unwrapped run has, the sharded one has under the same key.
    assert one_rank_keys <= two_rank_keys

    # Back to 1 rank from the 2-rank checkpoint of iteration 5.
    shutil.rmtree(moving / "checkpoints" / "00000006")
    run_training(load_train_config(TINY, overrides), moving)
    expected, got = read_metrics(reference), read_metrics(moving)
    assert [r["iteration"] for r in got] == list(range(7))
    for want, have in zip(expected, got):
        for key in LOSSES:
            assert have[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["iteration"], key)
