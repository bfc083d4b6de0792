"""The training loop shared by the three phases (pretrain, highres, distill).

``run_training(cfg, output_dir)``: join/create the process group, build the phase's model on the meta
device, shard it with FSDP2 (more than one rank) and materialise it on the device, initialise it, resume
from the newest complete checkpoint if any, then run iterations ``start … max_iter`` (inclusive, as the
official loop) and export the published backbone. On one of ``checkpoint.save_on_signals`` (Slurm's
time-limit warning, preemption) the iteration in flight finishes, is checkpointed, and the signal is
handed to the previous handler (:mod:`dinov2_core.train.preemption`).
"""

from __future__ import annotations

import logging
import os
import random
import resource
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dinov2_core.train.checkpointing import CheckpointManager
from dinov2_core.train.config import TrainConfig
from dinov2_core.train.data_loading import build_train_loader
from dinov2_core.train.distributed import DistributedContext, init_distributed, shutdown
from dinov2_core.train.exporting import export_model
from dinov2_core.train.meta_arch import DIAGNOSTIC_KEYS, LOSS_KEYS, SSLMetaArch
from dinov2_core.train.metrics import MetricsCallback, MetricsLogger
from dinov2_core.train.nan_guard import NanGuard
from dinov2_core.train.param_groups import apply_schedule_to_groups, build_param_groups
from dinov2_core.train.parallelize import (
    apply_activation_checkpointing,
    apply_autocast,
    apply_compile,
    build_adamw,
    clip_grad_norms,
    compute_dtype,
    shard_model,
    shards_parameters,
)
from dinov2_core.train.phases import build_phase_model, initialise_phase_model
from dinov2_core.train.preemption import SaveOnSignal
from dinov2_core.train.schedules import build_schedules
from dinov2_core.utils.atomic import atomic_write_text
from dinov2_core.utils.config import to_dict

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def write_resolved_config(cfg: TrainConfig, output_dir: Path) -> None:
    import yaml

    from dinov2_core.utils.redact import redact

    atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))


def parallelize(meta: SSLMetaArch, cfg: TrainConfig, context: DistributedContext,
                shard: bool | None = None) -> torch.dtype:
    """Shard every backbone and head and materialise the meta-device model on the device, uninitialised;
    returns the compute dtype. ``shard=None``: FSDP2 only with more than one rank (``True`` measures its
    cost at one rank, bench/bench_fsdp_overhead.py)."""
    device = context.device
    dtype = compute_dtype(device, cfg.parallel.mixed_precision)
    sharded = shards_parameters(context.world_size) if shard is None else shard
    networks = meta.networks()
    for child in meta.children():
        if not any(child is network for network in networks):
            child.to(device)  # loss modules: real (small) buffers
    for group in networks:
        for name, module in group.items():
            if name == "backbone":
                if group is meta.student and cfg.parallel.activation_checkpointing:
                    apply_activation_checkpointing(module)
                if cfg.parallel.compile:
                    apply_compile(module)
            if sharded:
                shard_model(module, dtype, cfg.parallel.reshard_after_forward, is_backbone=name == "backbone")
            else:
                apply_autocast(module, device, dtype)
        group.to_empty(device=device)
    return dtype


def build_model(cfg: TrainConfig, context: DistributedContext, initialise: bool = True,
                shard: bool | None = None) -> tuple[SSLMetaArch, torch.dtype]:
    """Collective: the phase's model, sharded and on the device, and its compute dtype.
    ``initialise=False`` leaves the weights uninitialised, for a caller that loads a full checkpoint next."""
    meta = build_phase_model(cfg, context)
    dtype = parallelize(meta, cfg, context, shard)
    if initialise:
        seed_everything(cfg.train.seed)  # same on every rank: each draws every parameter full-size, keeps its shard
        initialise_phase_model(meta, cfg)
    return meta, dtype


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _all_reduce_mean(values: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.stack([values[k].float().reshape(()) for k in keys]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))


def _all_reduce_sum_int(value: int, device: torch.device) -> int:
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return int(tensor.item())


def _usable(batch: dict[str, Any], min_rows: int, device: torch.device) -> bool:
    """Whether every rank has at least ``min_rows`` decoded images (KoLeo needs a neighbour)."""
    rows = 0 if batch.get("empty") else batch["collated_global_crops"].shape[0] // 2
    flag = torch.tensor([1 if rows >= min_rows else 0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class Trainer:
    def __init__(self, cfg: TrainConfig, output_dir: str | os.PathLike, context: DistributedContext,
                 metrics_callback: MetricsCallback | None = None, shard: bool | None = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.ctx = context
        self.metrics_callback = metrics_callback
        if context.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, self.output_dir)
        self.meta, self.dtype = build_model(cfg, context, shard=shard)
        seed_everything(cfg.train.seed + context.rank)  # drop path and the like differ per rank
        student = self.meta.student
        backbone = student["backbone"]
        self.optimizer = build_adamw(
            build_param_groups(student.named_parameters(), backbone.n_blocks, backbone.chunked_blocks,
                               cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
            betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        )
        self.schedules = build_schedules(cfg, context.world_size)
        self.checkpoints = CheckpointManager(self.output_dir, cfg.checkpoint.keep_last, context.rank, context.world_size)
        self.nan_guard = NanGuard(cfg.nan_guard.max_consecutive_bad_steps, cfg.nan_guard.max_restores)
        self.iteration = 0
        self.data_position = 0
        self.skipped_images = 0

    # ------------------------------------------------------------- state
    def trainer_state(self, iteration: int) -> dict[str, Any]:
        return {"iteration": iteration, "data_position": self.data_position, "skipped_images": self.skipped_images,
                "world_size": self.ctx.world_size}

    def save(self, iteration: int) -> Path:
        return self.checkpoints.save(iteration, self.meta, self.optimizer, self.trainer_state(iteration))

    def restore(self, path: Path, restore_rng: bool = True) -> tuple[int, int]:
        """Load a checkpoint; returns (saved iteration, saved data position)."""
        state = self.checkpoints.load(path, self.meta, self.optimizer, restore_rng=restore_rng)
        self.skipped_images = int(state.get("skipped_images", 0))
        if restore_rng and int(state.get("world_size", self.ctx.world_size)) != self.ctx.world_size:
            log.warning("resuming a world-size-%s checkpoint at world size %s: the run continues from the same "
                        "data position but is not bit-identical to an uninterrupted one",
                        state.get("world_size"), self.ctx.world_size)
        return int(state["iteration"]), int(state["data_position"])

    def maybe_resume(self) -> None:
        removed = self.checkpoints.clean_incomplete()
        if removed and self.ctx.is_main:
            log.warning("removed incomplete checkpoints: %s", removed)
        latest = self.checkpoints.latest() if self.cfg.checkpoint.resume else None
        if latest is None:
            return
        saved_iteration, self.data_position = self.restore(latest)
        self.iteration = saved_iteration + 1
        if self.ctx.is_main:
            log.info("resumed from %s (next iteration %d)", latest, self.iteration)

    # -------------------------------------------------------------- step
    def _step(self, batch: dict[str, Any], values: dict[str, float]) -> tuple[str, dict[str, float]]:
        apply_schedule_to_groups(self.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        loss, logged = self.meta.forward_losses(batch, values["teacher_temp"])
        losses = _all_reduce_mean(logged, self.ctx.device)
        verdict = self.nan_guard.observe(self.iteration, losses, can_restore=lambda: self.checkpoints.latest() is not None)
        if verdict != "ok":
            return verdict, losses
        loss.backward()
        clip_grad_norms(list(self.meta.student.values()), self.cfg.optim.clip_grad)
        self.optimizer.step()
        momentum = self.cfg.distill.ema_momentum if self.meta.distilling else values["momentum"]
        self.meta.update_teacher(momentum)
        return verdict, losses

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.maybe_resume()
        max_iter = cfg.max_iter
        global_batch = cfg.train.batch_size_per_gpu * self.ctx.world_size
        loader_iter = iter(build_train_loader(cfg, self.ctx.rank, self.ctx.world_size, self.data_position,
                                              self.dtype, pin_memory=self.ctx.device.type == "cuda"))
        metrics = MetricsLogger(self.output_dir, self.ctx.is_main, max_iter + 1, self.iteration, self.metrics_callback)
        min_rows = 2 if cfg.dino.koleo_loss_weight > 0 else 1
        last_saved = None
        self.meta.train()
        save_on_signal = SaveOnSignal(cfg.checkpoint.save_on_signals).install()
        try:
            while self.iteration <= max_iter:
                started = time.perf_counter()
                batch = next(loader_iter)
                self.data_position += global_batch
                self.skipped_images += _all_reduce_sum_int(int(batch["n_skipped"]), self.ctx.device)
                if not _usable(batch, min_rows, self.ctx.device):
                    continue  # too few decodable images on some rank: draw the next batch
                batch = _to_device(batch, self.ctx.device)
                values = self.schedules.at(self.iteration)
                verdict, losses = self._step(batch, values)
                if verdict == "restore":
                    latest = self.checkpoints.latest()
                    # Keep the data stream moving forward: replaying the same batches would diverge the same way.
                    position, skipped = self.data_position, self.skipped_images
                    saved_iteration, _ = self.restore(latest, restore_rng=False)
                    self.data_position, self.skipped_images = position, skipped
                    self.iteration = saved_iteration + 1
                    metrics.rewind(self.iteration)
                    log.warning("non-finite losses: restored %s, continuing at iteration %d", latest, self.iteration)
                    continue
                if self.ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - started
                record = {"iteration": self.iteration, **{k: losses.get(k, 0.0) for k in LOSS_KEYS + DIAGNOSTIC_KEYS},
                          **values, "images_per_s": global_batch / elapsed, "step_time_s": elapsed,
                          "peak_mem_mb": peak_memory_mb(self.ctx.device), "skipped_images": self.skipped_images,
                          "applied": verdict == "ok"}
                metrics.log(record)
                # No checkpoint inside a streak of bad steps: the one to restore must predate it.
                due = (self.iteration + 1) % cfg.checkpoint.period == 0 or self.iteration == max_iter
                if due and verdict == "ok":
                    last_saved = self.save(self.iteration)
                signum = save_on_signal.agreed_signal(self.ctx.device)
                # A dropped (non-finite) step changed nothing since the newest checkpoint worth keeping.
                if signum and verdict == "ok" and not due:
                    last_saved = self.save(self.iteration)
                self.iteration += 1
                if signum:
                    if self.ctx.is_main:
                        log.warning("signal %d: checkpoint written at iteration %d", signum, self.iteration - 1)
                    save_on_signal.hand_over(signum, self.iteration - 1)
        finally:
            save_on_signal.uninstall()
            metrics.close()
        export_dir = export_model(self.meta, cfg, self.output_dir, self.ctx)
        return {"iteration": self.iteration - 1, "export_dir": str(export_dir), "checkpoint": str(last_saved or ""),
                "last_metrics": metrics.last, "skipped_images": self.skipped_images, "rank": self.ctx.rank}


def export_from_checkpoint(cfg: TrainConfig, output_dir: str | os.PathLike,
                           checkpoint: str | os.PathLike | None = None) -> Path:
    """Write ``<output_dir>/export`` from a checkpoint of a run (default: its newest complete one), without training."""
    cfg.validate()
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    context = init_distributed(cfg.parallel.device)
    try:
        meta, _ = build_model(cfg, context, initialise=False)  # the checkpoint holds every weight
        manager = CheckpointManager(output_dir, cfg.checkpoint.keep_last, context.rank, context.world_size)
        path = Path(checkpoint) if checkpoint else manager.latest()
        if path is None:
            raise FileNotFoundError(f"{output_dir}: no complete checkpoint to export (checkpoints/<it>/.complete)")
        manager.load(path, meta, optimizer=None, restore_rng=False)
        return export_model(meta, cfg, output_dir, context)
    finally:
        shutdown(context)


def run_training(cfg: TrainConfig, output_dir: str | os.PathLike,
                 metrics_callback: MetricsCallback | None = None) -> dict[str, Any]:
    """Train one phase into ``output_dir``; resumes automatically from its newest complete checkpoint."""
    cfg.validate()
    # The backbone returns views of its output (cls / patch slices); we never modify them in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    context = init_distributed(cfg.parallel.device)
    try:
        return Trainer(cfg, output_dir, context, metrics_callback).fit()
    finally:
        shutdown(context)
