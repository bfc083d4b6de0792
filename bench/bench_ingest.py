"""Ingest throughput: list, hash and decode-check the 50,000 CIFAR-10 training JPEGs on a 2-worker
dask LocalCluster (ImageFolder source).

    python -m bench.bench_ingest
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from bench.cifar_data import DEFAULT_ROOT, cifar10_files
from bench.common import record
from curation.config import ClusterConfig, IngestConfig
from curation.ingest import run_ingest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_ingest"))
    args = parser.parse_args()
    files = cifar10_files()
    shutil.rmtree(args.work, ignore_errors=True)
    cfg = IngestConfig(cluster=ClusterConfig(n_workers=args.workers, threads_per_worker=1, processes=True))
    started = time.perf_counter()
    result = run_ingest(cfg, os.path.join(DEFAULT_ROOT, "train"), args.work)
    seconds = time.perf_counter() - started
    results = {"files": len(files), "images": result["num_images"], "rejected": result["num_rejected"],
               "seconds": round(seconds, 1), "files_per_s": round(len(files) / seconds, 1), "target_s": 120,
               "within_target": seconds <= 120, "workers": args.workers,
               "load_average_1min": round(os.getloadavg()[0], 1)}
    record("ingest_cifar10_50k", results, notes="includes LocalCluster start-up; machine shared with other jobs")
    print(results)


if __name__ == "__main__":
    main()
