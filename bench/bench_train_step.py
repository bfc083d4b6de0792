"""Training-step benchmark: step time, images/s, peak memory, FLOPs per step and MFU for a config.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one real step (teacher forward,
student forward + backward, heads), so they follow the config exactly (crop sizes, local crops,
masked-token buffer). MFU = achieved FLOP/s / ``--peak-tflops`` (default: 989 for an H100 / H200 in
bf16 dense, none on CPU).

    python bench/bench_train_step.py --config configs/train/tiny_pretrain.yaml --steps 5
    python bench/bench_train_step.py --config configs/train/vits14.yaml --steps 2 --batch 8 \
        student.drop_path_rate=0.0                                        # CPU smoke
    python bench/bench_train_step.py --config configs/train/vitl14.yaml --steps 10 --batch 32  # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/tiny_pretrain.yaml")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=None, help="train.batch_size_per_gpu override")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--name", default=None, help="result name (default: from the config)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import warnings

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import record
    from dinov2_core.data.synthetic import make_classification_dataset
    from dinov2_core.train.config import load_train_config
    from dinov2_core.train.distributed import init_distributed, shutdown
    from dinov2_core.train.trainer import Trainer, _to_device, peak_memory_mb
    from dinov2_core.train.data_loading import build_train_loader

    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        cfg0 = load_train_config(args.config, ["train.dataset=placeholder.txt", *overrides])
        size = max(cfg0.crops.global_crops_size, 32)
        data = make_classification_dataset(Path(tmp) / "data", num_classes=4, images_per_class=16, image_size=size)
        overrides = [f"train.dataset={data.manifest_uri}", "train.num_workers=0", *overrides]
        if args.batch:
            overrides.append(f"train.batch_size_per_gpu={args.batch}")
        cfg = load_train_config(args.config, overrides)
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # see trainer.run_training
        ctx = init_distributed(cfg.parallel.device)
        try:
            trainer = Trainer(cfg, Path(tmp) / "out", ctx)
            loader = iter(build_train_loader(cfg, ctx.rank, ctx.world_size, 0, trainer.dtype))
            values = trainer.schedules.at(cfg.optim.warmup_epochs * cfg.train.official_epoch_length)
            trainer.meta.train()

            def step(count_flops: bool = False) -> tuple[float, int]:
                batch = _to_device(next(loader), ctx.device)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                counter = FlopCounterMode(display=False) if count_flops else None
                if counter is not None:
                    with counter:
                        trainer._step(batch, values)
                else:
                    trainer._step(batch, values)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - started, counter.get_total_flops() if counter else 0

            _, flops = step(count_flops=True)  # warm-up step doubles as the FLOP count
            times = [step()[0] for _ in range(args.steps)]
            step_time = sorted(times)[len(times) // 2]
            batch = cfg.train.batch_size_per_gpu * ctx.world_size
            device_name = torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu"
            peak = args.peak_tflops or next((v for k, v in GPU_PEAK_TFLOPS.items() if k in device_name), None)
            achieved = flops / step_time / 1e12
            results = {
                "config": args.config, "arch": cfg.student.arch, "batch_per_rank": cfg.train.batch_size_per_gpu,
                "global_crops": cfg.crops.global_crops_size, "local_crops": f"{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
                "dtype": str(trainer.dtype).replace("torch.", ""), "device": device_name, "steps": args.steps,
                "torch_threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                "step_time_s": step_time, "images_per_s": batch / step_time,
                "peak_mem_mb": peak_memory_mb(ctx.device), "tflops_per_step": flops / 1e12,
                "achieved_tflops": achieved, "mfu": (achieved / peak) if peak else "n/a (no peak for this device)",
            }
        finally:
            shutdown(ctx)
    name = args.name or f"train_step_{Path(args.config).stem}_{'gpu' if results['device'] != 'cpu' else 'cpu'}"
    print(results)
    record(name, results, notes="median step after one warm-up step; FLOPs from FlopCounterMode over one full step")


if __name__ == "__main__":
    main()
