"""One-shot GPU check of the paths that have never run on a GPU (target: one H100/H200, <= 8 minutes).

Sections (each timed; a failing section is recorded with its error and the others still run):

1. ``train_vitl14``: ViT-L/14 bf16 pretraining step (``configs/train/vitl14.yaml``, batch 32), compile off
   and on: images/s, MFU (FLOPs from FlopCounterMode over one step / --peak-tflops), peak memory.
2. ``train_vitg14``: ViT-g/14 at batch 32 per GPU: images/s, peak memory (reference: the official code,
   ~54 images/s per H100 at 72 GB in a public benchmark).
3. ``batched_augmentation``: ``BatchedDataAugmentationDINO`` on device tensors: images/s.
4. ``embed_dedup``: ``curation.embed.run_embed`` (device cuda) + ``curation.dedup.run_dedup`` (faiss GPU
   when faiss has GPUs, else reported as skipped on GPU and run on CPU).

Prints a compact table and writes JSON to ``--out``. ``--device cpu --tiny`` runs the same code on tiny
models in under a minute, so the script is known to work before a GPU is available:

    python bench/gpu_check.py --out /tmp/gpu_check.json                       # on the GPU machine
    OMP_NUM_THREADS=2 python bench/gpu_check.py --device cpu --tiny --out /tmp/gpu_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS_BF16 = 989.0  # H100 / H200 SXM dense bf16


def _train_step(config: str, overrides: list[str], device: str, steps: int, peak_tflops: float | None,
                data_dir: Path) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dinov2_core.data.synthetic import make_classification_dataset
    from dinov2_core.train.config import load_train_config
    from dinov2_core.train.data_loading import build_train_loader
    from dinov2_core.train.distributed import init_distributed, shutdown
    from dinov2_core.train.trainer import Trainer, _to_device, peak_memory_mb

    probe = load_train_config(config, ["train.dataset=placeholder.txt", *overrides])
    data = make_classification_dataset(data_dir / f"data_{probe.crops.global_crops_size}", num_classes=2,
                                       images_per_class=8, image_size=probe.crops.global_crops_size)
    cfg = load_train_config(config, [f"train.dataset={data.manifest_uri}", "train.num_workers=0",
                                     f"parallel.device={device}", *overrides])
    ctx = init_distributed(device)
    try:
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(cfg, data_dir / "out", ctx)
        loader = iter(build_train_loader(cfg, 0, 1, 0, trainer.dtype, pin_memory=ctx.device.type == "cuda"))
        batch = _to_device(next(loader), ctx.device)  # one batch reused: the check times the model
        values = trainer.schedules.at(cfg.optim.warmup_epochs * cfg.train.official_epoch_length)
        trainer.meta.train()

        def sync() -> None:
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()

        trainer._step(batch, values)  # warm-up (and compilation)
        counter = FlopCounterMode(display=False)
        with counter:
            trainer._step(batch, values)
        sync()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            trainer._step(batch, values)
            sync()
            times.append(time.perf_counter() - started)
        step_s = sorted(times)[len(times) // 2]
        achieved = counter.get_total_flops() / step_s / 1e12
        return {"arch": cfg.student.arch, "batch": cfg.train.batch_size_per_gpu, "compile": cfg.parallel.compile,
                "dtype": str(trainer.dtype).replace("torch.", ""), "step_s": step_s,
                "images_per_s": cfg.train.batch_size_per_gpu / step_s, "tflops_per_step": counter.get_total_flops() / 1e12,
                "mfu": achieved / peak_tflops if peak_tflops else None, "peak_mem_gb": peak_memory_mb(ctx.device) / 1024}
    finally:
        shutdown(ctx)


def _batched_augmentation(device: str, tiny: bool) -> dict[str, Any]:
    import torch

    from dinov2_core.data.batched_augmentations import BatchedDataAugmentationDINO

    n, side = (16, 64) if tiny else (256, 256)
    augment = BatchedDataAugmentationDINO(global_crops_size=32 if tiny else 224, local_crops_size=16 if tiny else 98,
                                          local_crops_number=2 if tiny else 8)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    augment(images, generator)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    rounds = 3 if tiny else 10
    for _ in range(rounds):
        out = augment(images, generator)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"images": n, "source_px": side, "images_per_s": n * rounds / elapsed,
            "outputs": sorted(k for k, v in out.items() if hasattr(v, "shape"))}


def _embed_dedup(device: str, tiny: bool, work: Path) -> dict[str, Any]:
    from curation import knn
    from curation.config import DedupConfig, EmbedConfig, IngestConfig
    from curation.dedup import run_dedup
    from curation.embed import run_embed
    from curation.ingest import run_ingest
    from dinov2_core.data.synthetic import make_classification_dataset

    data = make_classification_dataset(work / "embed_data", num_classes=2, images_per_class=16 if tiny else 256,
                                       image_size=32 if tiny else 224)
    embed_cfg = EmbedConfig(model="arch", arch="vit_test" if tiny else "vit_large", image_size=32 if tiny else 224,
                            device=device, batch_size=16 if tiny else 128)
    manifest = run_ingest(IngestConfig(), data.manifest_uri, str(work / "ingest"))["manifest"]
    started = time.perf_counter()
    embedded = run_embed(embed_cfg, manifest, str(work / "embeddings"))
    embed_s = time.perf_counter() - started
    gpus = knn.gpu_count()
    use_gpu = "always" if (device == "cuda" and gpus) else "never"
    started = time.perf_counter()
    deduped = run_dedup(DedupConfig(use_gpu=use_gpu), manifest, str(work / "embeddings"), str(work / "dedup"))
    return {"images": 2 * (16 if tiny else 256), "embed_s": embed_s, "dedup_s": time.perf_counter() - started,
            "faiss_gpu": use_gpu == "always",
            "note": "" if use_gpu == "always" or device != "cuda" else "faiss has no GPU here: dedup ran on CPU",
            "embed_summary": {k: v for k, v in embedded.items() if isinstance(v, (int, float))},
            "dedup_summary": {k: v for k, v in deduped.items() if isinstance(v, (int, float))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny models and inputs (the CPU smoke run)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--peak-tflops", type=float, default=None, help=f"default {PEAK_TFLOPS_BF16} on cuda")
    args = parser.parse_args()

    import warnings

    import torch

    from bench.common import machine

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is visible (use --device cpu --tiny for the smoke run)")
    peak = args.peak_tflops or (PEAK_TFLOPS_BF16 if args.device == "cuda" else None)
    steps = 2 if args.tiny else args.steps
    if args.tiny:
        train_l = ("configs/train/tiny_pretrain.yaml", ["train.batch_size_per_gpu=8"])
        train_g = ("configs/train/tiny_pretrain.yaml", ["train.batch_size_per_gpu=16"])
    else:
        train_l = ("configs/train/vitl14.yaml", ["train.batch_size_per_gpu=32"])
        train_g = ("configs/train/vitg14.yaml", ["train.batch_size_per_gpu=32"])
    results: dict[str, Any] = {"machine": machine(), "device": args.device, "tiny": args.tiny, "sections": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("train_vitl14_compile_off", lambda: _train_step(train_l[0], [*train_l[1], "parallel.compile=false"],
                                                             args.device, steps, peak, work)),
            ("train_vitl14_compile_on", lambda: _train_step(train_l[0], [*train_l[1], "parallel.compile=true"],
                                                            args.device, steps, peak, work)),
            ("train_vitg14_batch32", lambda: _train_step(train_g[0], train_g[1], args.device, steps, peak, work)),
            ("batched_augmentation", lambda: _batched_augmentation(args.device, args.tiny)),
            ("embed_dedup", lambda: _embed_dedup(args.device, args.tiny, work)),
        ]
        for name, run in sections:
            started = time.perf_counter()
            try:
                outcome = {"ok": True, **run()}
            except Exception as error:  # a broken section is a result too: record it, run the rest
                outcome = {"ok": False, "error": f"{type(error).__name__}: {error}",
                           "traceback": traceback.format_exc(limit=6)}
            outcome["seconds"] = time.perf_counter() - started
            results["sections"][name] = outcome
            if args.device == "cuda":
                torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"{'section':28} {'ok':3} {'s':>6}  numbers")
    for name, outcome in results["sections"].items():
        numbers = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in outcome.items()
                   if k not in ("ok", "seconds", "traceback", "error")}
        print(f"{name:28} {'yes' if outcome['ok'] else 'NO':3} {outcome['seconds']:6.1f}  "
              f"{numbers if outcome['ok'] else outcome['error']}")


if __name__ == "__main__":
    main()
