"""2-level hierarchical k-means with resampling + balanced sampling on 1,000,000 × 384 embeddings.

    python -m bench.bench_kmeans --n 1000000 --dim 384 --level1 1000 --level2 100

Data: an imbalanced Gaussian mixture (bench/synthetic_embeddings.py, 2000 Zipf-sized concepts). Reports
the wall and CPU time of the clustering and of the balanced sampling, and how balanced the sample is
over the ground-truth concepts (normalised entropy, largest concept's share) against random sampling.
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--l2", action="store_true", help="squared-L2 k-means (the recipe) instead of spherical")
    parser.add_argument("--spread", type=float, default=1.5, help="within-concept std (0.5: separable concepts)")
    args = parser.parse_args()

    started = time.perf_counter()
    x, _, concept = mixture(args.n, args.dim, spread=args.spread)
    generate_s = time.perf_counter() - started
    levels_cfg = [KMeansLevelConfig(args.level1, args.resampling[0], 0, args.iters),
                  KMeansLevelConfig(args.level2, args.resampling[1], 0, args.iters)]
    started, cpu_started = time.perf_counter(), time.process_time()
    levels = hierarchical_kmeans(x, levels_cfg, "closest", 0, max_points_per_centroid=args.n, init=args.init,
                                 spherical=not args.l2)
    kmeans_s = time.perf_counter() - started
    kmeans_cpu_s = time.process_time() - cpu_started
    started = time.perf_counter()
    chosen = hierarchical_sampling(levels, args.target, seed=0)
    sampling_s = time.perf_counter() - started

    random_pick = np.random.default_rng(0).choice(len(x), args.target, replace=False)

    def concept_balance(selection: np.ndarray) -> tuple[float, float]:
        """(normalised entropy of the concept distribution, share of the largest concept)."""
        counts = np.bincount(concept[selection], minlength=concept.max() + 1)
        p = counts[counts > 0] / len(selection)
        return float(-(p * np.log(p)).sum() / np.log(len(counts))), float(counts.max() / len(selection))

    pool_balance = concept_balance(np.arange(len(x)))
    balanced_balance, random_balance = concept_balance(chosen), concept_balance(random_pick)
    sizes = leaf_sizes(levels)[0]
    results = {
        "n": args.n, "dim": args.dim, "levels": f"[{args.level1}, {args.level2}]", "n_iters": args.iters,
        "resampling_steps": list(args.resampling), "init": args.init, "metric": "l2" if args.l2 else "spherical",
        "kmeans_s": round(kmeans_s, 1), "kmeans_cpu_s": round(kmeans_cpu_s, 1),
        "load_average_1min": round(os.getloadavg()[0], 1), "target_s": 300, "within_target": kmeans_s <= 300,
        "sampling_s": round(sampling_s, 2), "selected": int(len(chosen)),
        "concepts": int(concept.max() + 1), "spread": args.spread,
        "concept_entropy_pool": pool_balance[0], "concept_entropy_balanced": balanced_balance[0],
        "concept_entropy_random": random_balance[0],
        "largest_concept_share_pool": pool_balance[1], "largest_concept_share_balanced": balanced_balance[1],
        "largest_concept_share_random": random_balance[1],
        "level1_cluster_size_min_max": [int(sizes.min()), int(sizes.max())],
        "generate_s": round(generate_s, 1),
    }
    record(f"hierarchical_kmeans_{args.n}_spread{args.spread}_{'l2' if args.l2 else 'spherical'}", results, notes="faiss-cpu, all points used (max_points_per_centroid=n)")
    print(results)


if __name__ == "__main__":
    main()
