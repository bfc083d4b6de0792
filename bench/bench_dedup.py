"""Near-duplicate detection quality of the default dedup pipeline on planted CIFAR-10 duplicates.

Copies of CIFAR-10 images are planted with JPEG re-encoding, resizing, crops keeping >= 90 % of the
area (the targets), horizontal flips and colour shifts (reported). The real stages run end to end
(ingest on dask, embed with the default ``pixels`` descriptor, dedup with faiss) and the duplicate
groups are scored against the planted ground truth:

- recall per transformation: planted copies that end in the same group as their source;
- precision (planted): among image pairs grouped together that involve a planted copy, the
  fraction that are copies of the same source;
- strict precision: the same over all grouped pairs, counting merges of two CIFAR originals as
  errors.

CIFAR-10 itself contains many real near-duplicates (the same photo re-cropped or re-coloured; see
the ``groups.png`` of the cleaning step), which would make the ground truth ambiguous. The originals
are therefore first deduplicated with the same pipeline at a looser threshold (``--clean-threshold``,
0.90), and copies are planted only from the kept originals. The number of originals removed by that
cleaning is reported; ``--no-clean`` runs on the raw originals.

    python -m bench.bench_dedup --originals 20000 --sources 1000

``--graph N`` instead times the k-NN dedup graph (IVF index, k=64, threshold, connected components)
over N synthetic 384-d embeddings with planted near-duplicates (bench/synthetic_embeddings.py):

    python -m bench.bench_dedup --graph 1000000
"""

from __future__ import annotations

import argparse
import collections
import io
import itertools
import os
import random
import shutil
import time

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from bench.cifar_data import cifar10_files
from bench.common import record
from curation.config import ClusterConfig, DedupConfig, EmbedConfig, IngestConfig
from curation.dedup import run_dedup
from curation.embed import run_embed
from curation.ingest import run_ingest
from curation.stage_io import read_parquet


def transforms(rng: random.Random) -> dict:
    def jpeg(im):
        buffer = io.BytesIO()
        im.save(buffer, "JPEG", quality=rng.randint(40, 85))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def resize(im):
        side = rng.choice([16, 20, 24, 48, 64, 96])
        return im.resize((side, side), Image.BICUBIC)

    def crop(im):
        w, h = im.size
        area, ratio = rng.uniform(0.9, 1.0), rng.uniform(0.9, 1.1)
        cw = min(w, round((area * w * h * ratio) ** 0.5))
        ch = min(h, max(1, int(np.ceil(area * w * h / cw))))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return im.crop((x, y, x + cw, y + ch))

    def flip(im):
        return ImageOps.mirror(im)

    def colour(im):
        im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
        return ImageEnhance.Color(im).enhance(rng.uniform(0.7, 1.3))

    return {"jpeg": jpeg, "resize": resize, "crop": crop, "flip": flip, "colour": colour}


def graph_benchmark(n: int, duplicates: int) -> None:
    """Time the k-NN duplicate graph over ``n`` embeddings and check the planted pairs are found."""
    from bench.synthetic_embeddings import mixture
    from curation.dedup import near_duplicate_edges
    from curation.knn import connected_components

    x, duplicate_of, _ = mixture(n - duplicates, 384, duplicates=duplicates)
    cfg = DedupConfig()
    started, cpu_started = time.perf_counter(), time.process_time()
    left, right, _ = near_duplicate_edges(cfg, x, None)
    labels = connected_components(len(x), left, right)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    planted = np.nonzero(duplicate_of >= 0)[0]
    found = float(np.mean(labels[planted] == labels[duplicate_of[planted]]))
    sizes = np.bincount(labels)
    results = {"n": len(x), "dim": 384, "k": cfg.k, "threshold": cfg.threshold, "index": "IVF (auto)",
               "nprobe": cfg.ivf_nprobe, "graph_s": round(seconds, 1), "graph_cpu_s": round(cpu_seconds, 1),
               "load_average_1min": round(os.getloadavg()[0], 1), "target_s": 600, "within_target": seconds <= 600,
               "edges": int(len(left)), "planted_pairs": int(len(planted)), "planted_recall": found,
               "largest_component": int(sizes.max())}
    record("dedup_knn_graph_1M", results, notes="faiss-cpu IVF inner product, k-NN + threshold + connected components")
    print(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--originals", type=int, default=20000)
    parser.add_argument("--sources", type=int, default=1000, help="planted copies per transformation")
    parser.add_argument("--threshold", type=float, default=DedupConfig.threshold)
    parser.add_argument("--clean-threshold", type=float, default=0.90)
    parser.add_argument("--no-clean", action="store_true", help="plant into the raw CIFAR originals")
    parser.add_argument("--work", default="/tmp/bench_dedup")
    parser.add_argument("--graph", type=int, default=0, help="time the k-NN graph over this many embeddings")
    parser.add_argument("--graph-duplicates", type=int, default=10_000)
    args = parser.parse_args()
    if args.graph:
        graph_benchmark(args.graph, args.graph_duplicates)
        return

    rng = random.Random(0)
    files = cifar10_files()
    rng.shuffle(files)
    originals = files[: args.originals]
    shutil.rmtree(args.work, ignore_errors=True)
    cluster = ClusterConfig(n_workers=2, threads_per_worker=1, processes=True)
    originals_dir = os.path.join(args.work, "originals")
    os.makedirs(originals_dir)
    for index, path in enumerate(originals):
        shutil.copyfile(path, os.path.join(originals_dir, f"o{index:06d}.jpg"))
    kept_originals = sorted(os.path.join(originals_dir, name) for name in os.listdir(originals_dir))
    cleaning_removed = 0
    if not args.no_clean:
        clean_ingest = run_ingest(IngestConfig(cluster=cluster), originals_dir, os.path.join(args.work, "clean_ingest"))
        clean_embed = run_embed(EmbedConfig(cluster=cluster), clean_ingest["manifest"], os.path.join(args.work, "clean_emb"))
        clean = run_dedup(DedupConfig(threshold=args.clean_threshold, decontam_threshold=args.clean_threshold),
                          clean_ingest["manifest"], clean_embed["embeddings"], os.path.join(args.work, "clean_dedup"))
        kept_originals = sorted(read_parquet(clean["manifest"]).column("uri").to_pylist())
        cleaning_removed = clean["num_removed"]

    images_dir = os.path.join(args.work, "copies")
    os.makedirs(images_dir)
    source_of: dict[str, str] = {path: path for path in kept_originals}  # image -> original it was made from
    kind_of: dict[str, str] = {}
    for name, transform in transforms(rng).items():
        for index in rng.sample(range(len(kept_originals)), args.sources):
            image = transform(Image.open(kept_originals[index]).convert("RGB"))
            target = os.path.join(images_dir, f"c{name}-{index:06d}.png")
            image.save(target)
            source_of[target] = kept_originals[index]
            kind_of[target] = name
    pool_list = os.path.join(args.work, "pool.txt")
    with open(pool_list, "w") as handle:
        handle.writelines(path + "\n" for path in sorted(source_of))

    timings = {}
    started = time.perf_counter()
    ingest = run_ingest(IngestConfig(cluster=cluster), pool_list, os.path.join(args.work, "ingest"))
    timings["ingest_s"] = time.perf_counter() - started
    started = time.perf_counter()
    embed = run_embed(EmbedConfig(cluster=cluster), ingest["manifest"], os.path.join(args.work, "embeddings"))
    timings["embed_s"] = time.perf_counter() - started
    started = time.perf_counter()
    cfg = DedupConfig(threshold=args.threshold, decontam_threshold=min(args.threshold, DedupConfig.decontam_threshold))
    dedup = run_dedup(cfg, ingest["manifest"], embed["embeddings"], os.path.join(args.work, "dedup"))
    timings["dedup_s"] = time.perf_counter() - started

    manifest = read_parquet(ingest["manifest"]).to_pylist()
    uri_of = {row["row_id"]: row["uri"] for row in manifest}
    group_of = {row["row_id"]: row["row_id"] for row in manifest}
    for row in read_parquet(dedup["removed"]).to_pylist():
        if row["kept_row_id"] is not None:
            group_of[row["row_id"]] = row["kept_row_id"]
    members = collections.defaultdict(list)
    for row_id, group in group_of.items():
        members[group].append(uri_of[row_id])
    group_by_uri = {uri_of[r]: g for r, g in group_of.items()}

    rows = []
    for name in transforms(rng):
        copies = [u for u, k in kind_of.items() if k == name]
        found = sum(group_by_uri[u] == group_by_uri[source_of[u]] for u in copies)
        rows.append({"transformation": name, "planted": len(copies), "found": found,
                     "recall": found / len(copies), "target": "yes" if name in ("jpeg", "resize", "crop") else "reported"})
    planted_pairs = planted_correct = all_pairs = all_correct = 0
    for group in members.values():
        for a, b in itertools.combinations(group, 2):
            same = source_of[a] == source_of[b]
            all_pairs += 1
            all_correct += same
            if a in kind_of or b in kind_of:
                planted_pairs += 1
                planted_correct += same
    target_copies = [u for u, k in kind_of.items() if k in ("jpeg", "resize", "crop")]
    results = {
        "rows": rows,
        "images": len(manifest),
        "originals": len(originals),
        "originals_removed_by_cleaning": cleaning_removed,
        "clean_threshold": None if args.no_clean else args.clean_threshold,
        "threshold": cfg.threshold,
        "recall_targets_jpeg_resize_crop": sum(group_by_uri[u] == group_by_uri[source_of[u]] for u in target_copies) / len(target_copies),
        "precision_planted_pairs": planted_correct / max(1, planted_pairs),
        "precision_strict_all_pairs": all_correct / max(1, all_pairs),
        "grouped_pairs_planted": planted_pairs,
        "grouped_pairs_all": all_pairs,
        "original_original_pairs": all_pairs - planted_pairs,
        "embed_images_per_s": embed["images_per_s"],
        **{k: round(v, 1) for k, v in timings.items()},
        "groups_png": dedup["groups_png"],
    }
    record("dedup_cifar10_planted", results,
           notes="default pixels descriptor (12x12 RGB thumbnail, 3x3 crop views + mirrored view), k=64, "
                 "faiss IVF/flat + cosine threshold + connected components; CIFAR-10 originals contain real "
                 "near-duplicates: the originals are first deduplicated at --clean-threshold (unless --no-clean)")
    print(results)


if __name__ == "__main__":
    main()
