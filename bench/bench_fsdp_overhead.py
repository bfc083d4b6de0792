"""FSDP2's cost at one rank, and the optimizer / clipping / EMA kernels, side by side in one process.

Step time (median of ``--steps`` after a warm-up, the variants interleaved so machine load hits all alike):

- ``trainer``: ``Trainer._step`` at one rank as it runs now (unwrapped, autocast for bf16, fused AdamW);
- ``plain``: the same work written inline on the same unwrapped model (forward, backward, clipping,
  AdamW, EMA): the floor a one-rank run can reach;
- ``fsdp2``: ``Trainer._step`` with the model wrapped by ``fully_shard`` at world size 1 (the old path).

Kernels on the student's parameters: AdamW ``foreach`` vs ``fused`` step, the old hand-written grad
clipping vs ``clip_grad_norm_(foreach=True)``, the EMA as multiply + add vs ``_foreach_lerp_``.

    OMP_NUM_THREADS=2 python bench/bench_fsdp_overhead.py --config configs/train/tiny_pretrain.yaml
    OMP_NUM_THREADS=2 python bench/bench_fsdp_overhead.py --config configs/train/cifar_vit_test.yaml --batch 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/tiny_pretrain.yaml")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch", type=int, default=None, help="train.batch_size_per_gpu override")
    parser.add_argument("--name", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import warnings

    import torch

    from bench.common import record
    from dinov2_core.data.synthetic import make_classification_dataset
    from dinov2_core.train.config import load_train_config
    from dinov2_core.train.data_loading import build_train_loader
    from dinov2_core.train.distributed import init_distributed, shutdown
    from dinov2_core.train.parallelize import local_tensors
    from dinov2_core.train.trainer import Trainer, _to_device

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = load_train_config(args.config, ["train.dataset=placeholder.txt", *args.overrides])
        size = max(cfg0.crops.global_crops_size, 32)
        data = make_classification_dataset(Path(tmp) / "data", num_classes=4, images_per_class=16, image_size=size)
        overrides = [f"train.dataset={data.manifest_uri}", "train.num_workers=0", *args.overrides]
        if args.batch:
            overrides.append(f"train.batch_size_per_gpu={args.batch}")
        cfg = load_train_config(args.config, overrides)
        ctx = init_distributed(cfg.parallel.device)
        try:
            trainers = {"trainer": Trainer(cfg, Path(tmp) / "a", ctx, shard=False),
                        "fsdp2": Trainer(cfg, Path(tmp) / "b", ctx, shard=True)}
            loader = iter(build_train_loader(cfg, 0, 1, 0, trainers["trainer"].dtype))
            batches = [_to_device(next(loader), ctx.device) for _ in range(3)]
            values = trainers["trainer"].schedules.at(cfg.optim.warmup_epochs * cfg.train.official_epoch_length)
            plain = trainers["trainer"]

            def plain_step(batch) -> None:
                plain.optimizer.zero_grad(set_to_none=True)
                loss, _ = plain.meta.forward_losses(batch, values["teacher_temp"])
                loss.backward()
                for module in plain.meta.student.values():
                    torch.nn.utils.clip_grad_norm_(list(module.parameters()), cfg.optim.clip_grad, foreach=True)
                plain.optimizer.step()
                torch._foreach_lerp_([p.data for p in plain.meta.teacher.parameters()],
                                     [p.data for p in plain.meta.student.parameters()], 1 - values["momentum"])

            variants = {"trainer": lambda b: trainers["trainer"]._step(b, values), "plain": plain_step,
                        "fsdp2": lambda b: trainers["fsdp2"]._step(b, values)}
            for trainer in trainers.values():
                trainer.meta.train()
            times: dict[str, list[float]] = {name: [] for name in variants}
            for index in range(args.steps + 1):
                for name, step in variants.items():
                    batch = batches[index % len(batches)]
                    started = time.perf_counter()
                    step(batch)
                    if index:  # the first round is the warm-up
                        times[name].append(time.perf_counter() - started)
            step_s = {name: statistics.median(t) for name, t in times.items()}

            # Kernels, on the unwrapped student with its last gradients.
            params = [p for p in plain.meta.student.parameters() if p.grad is not None]
            kernel_ms = {}
            for kind in ("foreach", "fused"):
                optimizer = torch.optim.AdamW(params, lr=1e-4, **{kind: True})
                optimizer.step()
                kernel_ms[f"adamw_{kind}"] = 1e3 * _median_time(optimizer.step, 5)

            def old_clip() -> None:
                grads = [p.grad for p in params]
                total = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum().sqrt()
                torch._foreach_mul_(grads, torch.clamp(1e9 / (total + 1e-6), max=1.0))

            kernel_ms["clip_old"] = 1e3 * _median_time(old_clip, 5)
            kernel_ms["clip_grad_norm_foreach"] = 1e3 * _median_time(
                lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True), 5)
            target = [p.detach().clone() for p in params]
            source = local_tensors([p.data for p in params])

            def ema_mul_add() -> None:
                torch._foreach_mul_(target, 0.99)
                torch._foreach_add_(target, source, alpha=0.01)

            kernel_ms["ema_mul_add"] = 1e3 * _median_time(ema_mul_add, 5)
            kernel_ms["ema_lerp"] = 1e3 * _median_time(lambda: torch._foreach_lerp_(target, source, 0.01), 5)
            results = {
                "config": args.config, "arch": cfg.student.arch, "batch": cfg.train.batch_size_per_gpu,
                "dtype": str(trainers["trainer"].dtype).replace("torch.", ""), "steps": args.steps,
                "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                **{f"step_s_{name}": value for name, value in step_s.items()},
                "ratio_trainer_over_plain": step_s["trainer"] / step_s["plain"],
                "ratio_fsdp2_over_plain": step_s["fsdp2"] / step_s["plain"],
                **{f"{name}_ms": value for name, value in kernel_ms.items()},
            }
        finally:
            shutdown(ctx)
    print(results)
    record(args.name or f"fsdp_overhead_{Path(args.config).stem}", results,
           notes="one process, variants interleaved; ratio_* = median step time over the inline unwrapped step")


if __name__ == "__main__":
    main()
