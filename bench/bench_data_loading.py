"""Data-loading throughput per CPU core: decode + DINOv2 multi-crop augmentation (2 global + 8 local).

The number that matters on a GPU node is how many images per second one data-loader worker (one
core) can feed: with N workers the loader delivers roughly N times that. The baseline in the same
run is decode + a single resize/crop to the global size (what a supervised loader does), so the
ratio shows what the 10-crop recipe costs. Both augmentation backends are measured in the same run:
``per_image`` (``DataAugmentationDINO``, one image at a time) and ``batched``
(decode to a uint8 square of ``--source-size`` per image, then ``BatchedDataAugmentationDINO`` on
batches of ``--batch-size``, as ``crops.augmentation=batched`` does in the collate function).

    python -m bench.bench_data_loading --images <tmp>/cifar10/train   # <tmp>: tempfile.gettempdir(), see bench/cifar_data.py --count 200
    python -m bench.bench_data_loading --synthetic 256 --count 200      # no dataset needed
    python -m bench.bench_data_loading --cifar --count 200              # 2×32 + 2×16 crops of 32 px images
    python -m bench.bench_data_loading --cifar --count 20 --no-record   # smoke run, writes nothing

Runs single-threaded (``torch.set_num_threads(1)``), the way a DataLoader worker runs.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import torch
from torchvision.transforms import v2

from bench.common import record
from dinov2_core.data.augmentations import DataAugmentationDINO
from dinov2_core.data.batched_augmentations import BatchedDataAugmentationDINO
from dinov2_core.data.image_io import load_image
from dinov2_core.train.data_loading import SquareSource


def _images(args: argparse.Namespace) -> list[str]:
    if args.images:
        paths = sorted(glob.glob(os.path.join(args.images, "**", "*.jpg"), recursive=True))
        if not paths:
            raise SystemExit(f"no .jpg files under {args.images}")
        return paths[: args.count]
    from PIL import Image
    import numpy as np

    folder = tempfile.mkdtemp(prefix="bench-data-")
    rng = np.random.default_rng(0)
    paths = []
    for index in range(args.count):
        array = rng.integers(0, 255, size=(args.synthetic, args.synthetic, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{index}.jpg")
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths


def _throughput(paths: list[str], transform) -> float:
    start = time.perf_counter()
    for index, path in enumerate(paths):
        transform(load_image(path), index)
    return len(paths) / (time.perf_counter() - start)


def _batched_throughput(paths: list[str], source: SquareSource, augmentation: BatchedDataAugmentationDINO,
                        batch_size: int) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for first in range(0, len(paths), batch_size):
        images = torch.stack([source(load_image(path)) for path in paths[first:first + batch_size]])
        augmentation(images, generator)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of .jpg images (e.g. extracted CIFAR-10)")
    parser.add_argument("--synthetic", type=int, default=256, help="side of generated JPEGs when --images is absent")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--cifar", action="store_true",
                        help="the CIFAR-10 setting: 32 px images, 2×32 global + 2×16 local crops")
    parser.add_argument("--source-size", type=int, default=None,
                        help="batched backend: side of the uint8 square each image is reduced to (default: global size)")
    parser.add_argument("--batch-size", type=int, default=64, help="batched backend: images per call")
    parser.add_argument("--no-record", action="store_true", help="print only; write no results")
    args = parser.parse_args()
    if args.cifar:
        args.synthetic, args.global_size, args.local_size, args.local_crops = 32, 32, 16, 2
    torch.set_num_threads(1)

    paths = _images(args)
    crop_settings = dict(local_crops_number=args.local_crops, global_crops_size=args.global_size,
                         local_crops_size=args.local_size)
    multicrop = DataAugmentationDINO(**crop_settings)
    batched = BatchedDataAugmentationDINO(**crop_settings)
    source = SquareSource(args.source_size or args.global_size)
    baseline = v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(args.global_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    _throughput(paths[:10], lambda image, seed: multicrop(image, seed=seed))  # warm-up
    dino = _throughput(paths, lambda image, seed: multicrop(image, seed=seed))
    _batched_throughput(paths[:10], source, batched, args.batch_size)  # warm-up
    fast = _batched_throughput(paths, source, batched, args.batch_size)
    plain = _throughput(paths, lambda image, seed: baseline(image))
    crops = f"{2 + args.local_crops} crops (2×{args.global_size} + {args.local_crops}×{args.local_size})"
    results = {
        "rows": [
            {"pipeline": f"decode + {crops}, per_image",
             "images_per_s_per_core": round(dino, 1), "ms_per_image": round(1000 / dino, 2)},
            {"pipeline": f"decode + {crops}, batched ({args.batch_size}/call, source {source.size} px)",
             "images_per_s_per_core": round(fast, 1), "ms_per_image": round(1000 / fast, 2)},
            {"pipeline": f"decode + 1 crop {args.global_size} (baseline)",
             "images_per_s_per_core": round(plain, 1), "ms_per_image": round(1000 / plain, 2)},
        ],
        "images": len(paths),
        "source": args.images or f"generated {args.synthetic}px JPEGs",
        "multicrop_cost_vs_baseline": round(plain / dino, 2),
        "batched_speedup_vs_per_image": round(fast / dino, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if not args.no_record:
        record(f"data_loading_multicrop{'_cifar' if args.cifar else ''}", results,
               notes="one thread, as in one DataLoader worker; loader throughput ≈ workers × this")
    print(f"multi-crop per_image: {dino:.1f} img/s/core; batched: {fast:.1f} img/s/core "
          f"(×{fast / dino:.2f}); baseline: {plain:.1f} img/s/core; ratio {plain / dino:.2f}")


if __name__ == "__main__":
    main()
