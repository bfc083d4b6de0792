"""2-level hierarchical k-means with resampling + balanced sampling on 1,000,000 × 384 embeddings.

    python -m bench.bench_kmeans --n 1000000 --dim 384 --level1 1000 --level2 100

Data: an imbalanced Gaussian mixture (bench/synthetic_embeddings.py). Reports the wall time of the
clustering and of the balanced sampling, and how balanced the sample is compared with random sampling.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import record
from bench.synthetic_embeddings import mixture
from curation.config import KMeansLevelConfig
from curation.kmeans import hierarchical_kmeans, leaf_sizes
from curation.sampling import hierarchical_sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--level1", type=int, default=1000)
    parser.add_argument("--level2", type=int, default=100)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--resampling", type=int, nargs=2, default=(2, 3))
    parser.add_argument("--init", default="kmeans++", choices=("kmeans++", "afkmc2", "random"))
    parser.add_argument("--target", type=int, default=100_000)
    args = parser.parse_args()

    started = time.perf_counter()
    x, _ = mixture(args.n, args.dim)
    generate_s = time.perf_counter() - started
    levels_cfg = [KMeansLevelConfig(args.level1, args.resampling[0], 0, args.iters),
                  KMeansLevelConfig(args.level2, args.resampling[1], 0, args.iters)]
    started, cpu_started = time.perf_counter(), time.process_time()
    levels = hierarchical_kmeans(x, levels_cfg, "closest", 0, max_points_per_centroid=args.n, init=args.init)
    kmeans_s = time.perf_counter() - started
    kmeans_cpu_s = time.process_time() - cpu_started
    started = time.perf_counter()
    chosen = hierarchical_sampling(levels, args.target, seed=0)
    sampling_s = time.perf_counter() - started

    sizes = leaf_sizes(levels)[0]
    balanced = np.bincount(levels[0].labels[chosen], minlength=len(sizes))
    rand = np.bincount(levels[0].labels[np.random.default_rng(0).choice(len(x), args.target, replace=False)],
                       minlength=len(sizes))
    results = {
        "n": args.n, "dim": args.dim, "levels": f"[{args.level1}, {args.level2}]", "n_iters": args.iters,
        "resampling_steps": list(args.resampling), "init": args.init,
        "kmeans_s": round(kmeans_s, 1), "kmeans_cpu_s": round(kmeans_cpu_s, 1),
        "load_average_1min": round(__import__("os").getloadavg()[0], 1), "target_s": 300, "within_target": kmeans_s <= 300,
        "sampling_s": round(sampling_s, 2), "selected": int(len(chosen)),
        "level1_size_max_over_median_pool": float(sizes.max() / max(1, np.median(sizes))),
        "level1_size_max_over_median_balanced": float(balanced.max() / max(1, np.median(balanced))),
        "level1_size_max_over_median_random": float(rand.max() / max(1, np.median(rand))),
        "generate_s": round(generate_s, 1),
    }
    record("hierarchical_kmeans_1M", results, notes="faiss-cpu, all points used (max_points_per_centroid=n)")
    print(results)


if __name__ == "__main__":
    main()
