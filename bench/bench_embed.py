"""Embedding throughput of the curation embed stage on CIFAR-10 JPEGs: the default ``pixels``
descriptor (with and without crop views) and a random-init ViT-S/14 at 224 px (CPU, batch 32).

    python -m bench.bench_embed --images 4096
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

from bench.cifar_data import cifar10_files
from bench.common import record
from curation.config import ClusterConfig, EmbedConfig
from curation.embed import run_embed
from curation.stage_io import write_parquet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--vit-images", type=int, default=128)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_embed"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    files = cifar10_files()
    cluster = ClusterConfig(n_workers=2, threads_per_worker=1, processes=True)
    rows = []
    variants = [
        ("pixels 12px + crop/flip views (default)", EmbedConfig(cluster=cluster, shard_size=1024), args.images),
        ("pixels 12px, no views", EmbedConfig(crop_views=False, cluster=cluster, shard_size=1024), args.images),
        ("vit_small random init, 224 px", EmbedConfig(model="arch", arch="vit_small", image_size=224, batch_size=32,
                                                      shard_size=64, cluster=cluster), args.vit_images),
    ]
    for name, cfg, count in variants:
        manifest = os.path.join(args.work, f"manifest-{count}.parquet")
        write_parquet([{"row_id": i, "uri": path} for i, path in enumerate(files[:count])], manifest)
        result = run_embed(cfg, manifest, os.path.join(args.work, name.split()[0] + str(len(rows))))
        rows.append({"model": name, "images": result["num_embedded"], "dim": result["dim"],
                     "images_per_s": result["images_per_s"]})
    results = {"rows": rows, "workers": 2, "load_average_1min": round(os.getloadavg()[0], 1)}
    record("embed_throughput", results, notes="2 dask worker processes, 1 torch thread each, CPU; includes decode")
    print(results)


if __name__ == "__main__":
    main()
