"""Data-loading throughput per CPU core: decode + DINOv2 multi-crop augmentation (2 global + 8 local).

The number that matters on a GPU node is how many images per second one data-loader worker (one
core) can feed: with N workers the loader delivers roughly N times that. The baseline in the same
run is decode + a single resize/crop to the global size (what a supervised loader does), so the
ratio shows what the 10-crop recipe costs.

    python -m bench.bench_data_loading --images /tmp/cifar10/train --count 200
    python -m bench.bench_data_loading --synthetic 256 --count 200      # no dataset needed

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
from dinov2_core.data.image_io import load_image


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of .jpg images (e.g. extracted CIFAR-10)")
    parser.add_argument("--synthetic", type=int, default=256, help="side of generated JPEGs when --images is absent")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)

    paths = _images(args)
    multicrop = DataAugmentationDINO(
        local_crops_number=args.local_crops, global_crops_size=args.global_size, local_crops_size=args.local_size
    )
    baseline = v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(args.global_size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    _throughput(paths[:10], lambda image, seed: multicrop(image, seed=seed))  # warm-up
    dino = _throughput(paths, lambda image, seed: multicrop(image, seed=seed))
    plain = _throughput(paths, lambda image, seed: baseline(image))
    crops = 2 + args.local_crops
    record(
        "data_loading_multicrop",
        {
            "rows": [
                {"pipeline": f"decode + {crops} crops (2×{args.global_size} + {args.local_crops}×{args.local_size})",
                 "images_per_s_per_core": round(dino, 1), "ms_per_image": round(1000 / dino, 1)},
                {"pipeline": f"decode + 1 crop {args.global_size} (baseline)",
                 "images_per_s_per_core": round(plain, 1), "ms_per_image": round(1000 / plain, 1)},
            ],
            "images": len(paths),
            "source": args.images or f"generated {args.synthetic}px JPEGs",
            "multicrop_cost_vs_baseline": round(plain / dino, 2),
            "load_average_1min": round(os.getloadavg()[0], 2),
        },
        notes="one thread, as in one DataLoader worker; loader throughput ≈ workers × this",
    )
    print(f"multi-crop: {dino:.1f} img/s/core; baseline: {plain:.1f} img/s/core; ratio {plain / dino:.2f}")


if __name__ == "__main__":
    main()
