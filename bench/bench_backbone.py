"""Backbone training-step speed: forward + backward of DINOv2 ViTs, SDPA vs naive attention.

CPU (default): ``vit_test`` and ``vit_small`` (patch 14, 224 px, batch 8), each with
``attn_backend="sdpa"`` (``F.scaled_dot_product_attention``) and ``"math"`` (explicit
matmul → softmax → matmul). GPU (``--device cuda``): additionally ViT-L/14 in bf16 autocast,
reporting images/s and model FLOPs utilisation (MFU) against the GPU's dense bf16 peak.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one real step (matmuls,
convolutions and SDPA, forward and backward), so MFU needs no hand-written formula.

    python bench/bench_backbone.py                       # CPU, a few minutes on 2 cores
    python bench/bench_backbone.py --device cuda         # adds ViT-L/14 bf16 images/s and MFU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import record  # noqa: E402
from dinov2_core.models import build_backbone  # noqa: E402

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.05}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> None:
    autocast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    with autocast:
        out = model.forward_features(images)
        loss = out["x_norm_clstoken"].float().pow(2).mean() + out["x_norm_patchtokens"].float().pow(2).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def build(arch: str, backend: str, size: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(arch, patch_size=14, img_size=size, init_values=1e-5, block_chunks=0,
                          attn_backend=backend).to(device).train()


def model_flops(arch: str, batch: int, size: int, device: torch.device, dtype: torch.dtype | None) -> int:
    """FLOPs of one forward+backward step, counted on the SDPA model so every backend is scored alike."""
    model = build(arch, "sdpa", size, device)
    with FlopCounterMode(display=False) as counter:
        train_step(model, torch.randn(batch, 3, size, size, device=device), dtype)
    return counter.get_total_flops()


def time_backends(arch: str, backends: list[str], batch: int, size: int, device: torch.device,
                  dtype: torch.dtype | None, warmup: int, iters: int) -> dict[str, tuple[list[float], list[float]]]:
    """Wall and process-CPU seconds per step for each backend, steps interleaved (A, B, A, B, …) so that
    load from other processes on a shared machine hits every backend alike."""
    models = {backend: build(arch, backend, size, device) for backend in backends}
    images = torch.randn(batch, 3, size, size, device=device)
    for model in models.values():
        for _ in range(warmup):
            train_step(model, images, dtype)
    synchronize(device)
    timings: dict[str, tuple[list[float], list[float]]] = {backend: ([], []) for backend in backends}
    for _ in range(iters):
        for backend, model in models.items():
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(model, images, dtype)
            synchronize(device)
            timings[backend][0].append(time.perf_counter() - wall)
            timings[backend][1].append(time.process_time() - cpu)
    return timings


def summarise(arch: str, backend: str, batch: int, size: int, dtype: torch.dtype | None, walls: list[float],
              cpus: list[float], flops: int, peak: float | None, device: torch.device) -> dict:
    step = statistics.median(walls)
    row = {
        "arch": arch,
        "attention": backend,
        "dtype": str(dtype).replace("torch.", "") if dtype else "float32",
        "batch": batch,
        "px": size,
        "step_ms": 1000 * step,
        "images_per_s": batch / step,
        "tflops_per_step": flops / 1e12,
        "achieved_tflops": flops / step / 1e12,
    }
    if device.type == "cpu":
        row["cpu_s_per_step"] = statistics.median(cpus)  # CPU seconds summed over threads: robust to waiting
    if peak:
        row["mfu"] = flops / step / (peak * 1e12)
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=3, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    parser.add_argument("--large-batch", type=int, default=64, help="ViT-L/14 batch on CUDA")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    peak = peak_tflops(device, args.peak_tflops)

    configs = [(arch, 8, 224, None) for arch in ("vit_test", "vit_small")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        configs.append(("vit_large", args.large_batch, 224, torch.bfloat16))
    rows = []
    for arch, batch, size, dtype in configs:
        flops = model_flops(arch, batch, size, device, dtype)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timings = time_backends(arch, ["sdpa", "math"], batch, size, device, dtype, args.warmup, args.iters)
        for backend, (walls, cpus) in timings.items():
            row = summarise(arch, backend, batch, size, dtype, walls, cpus, flops, peak, device)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows.append(row)
    results = {"rows": rows, "device": args.device, "threads": torch.get_num_threads(), "iters": args.iters,
               "load_avg_1min_after": os.getloadavg()[0]}
    if not args.no_record:
        name = "bench_backbone" if device.type == "cpu" else "bench_backbone_cuda"
        record(name, results, notes="forward+backward of forward_features (cls + patch loss); median of timed steps, sdpa/math steps interleaved; peak_mem_gib covers both backends")
    return results


if __name__ == "__main__":
    main()
