"""Typed configs of the curation stages (ingest, embed, dedup, curate) and of the dask cluster they use.

Built with :mod:`dinov2_core.utils.config`: unknown keys and bad values raise ``ConfigError`` naming
the dotted key and the allowed values, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dinov2_core.utils.config import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ClusterConfig:
    """Where the parallel work runs.

    ``local`` starts a ``dask.distributed.LocalCluster``; ``address`` connects to a running scheduler;
    ``slurm`` starts a ``dask_jobqueue.SLURMCluster`` (needs the optional dask-jobqueue package).
    """

    kind: Literal["local", "address", "slurm"] = "local"
    address: str | None = None
    n_workers: int = 2
    threads_per_worker: int = 1
    processes: bool = True
    memory_limit: str = "auto"
    # Slurm-backed workers (dask-jobqueue)
    slurm_queue: str | None = None
    slurm_account: str | None = None
    slurm_walltime: str = "01:00:00"
    slurm_cores: int = 4
    slurm_memory: str = "16GB"
    slurm_jobs: int = 1

    def validate(self) -> None:
        _require(self.n_workers >= 1, f"cluster.n_workers: must be >= 1, got {self.n_workers}")
        _require(self.threads_per_worker >= 1, f"cluster.threads_per_worker: must be >= 1, got {self.threads_per_worker}")
        if self.kind == "address":
            _require(bool(self.address), "cluster.address: required when cluster.kind is 'address' (e.g. tcp://host:8786)")
        _require(self.slurm_jobs >= 1, f"cluster.slurm_jobs: must be >= 1, got {self.slurm_jobs}")


@dataclass
class IngestConfig:
    """Listing, hashing and decode checks of raw images.

    Transient read failures (connection refused or reset, timeouts, S3 5xx / throttling) are retried
    ``read_retries`` times with exponential backoff starting at ``read_backoff_s`` (on top of botocore's
    own retries). Reads still failing after that are *losses*: up to ``max_loss_fraction`` of all
    listed images the stage writes its outputs but does not mark itself finished (a re-run recomputes);
    above it the stage raises. Permanently broken files (undecodable, missing) are rejects, not losses.
    """

    source_kind: Literal["auto", "directory", "imagefolder", "filelist", "tar"] = "auto"
    extensions: list[str] = field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"])
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    min_side: int = 1
    files_per_task: int = 1000
    read_retries: int = 5
    read_backoff_s: float = 0.5
    max_loss_fraction: float = 0.01
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        _require(self.read_retries >= 0, f"read_retries: must be >= 0, got {self.read_retries}")
        _require(self.read_backoff_s >= 0, f"read_backoff_s: must be >= 0, got {self.read_backoff_s}")
        _require(0.0 <= self.max_loss_fraction <= 1.0,
                 f"max_loss_fraction: must be in [0, 1], got {self.max_loss_fraction}")
        _require(self.max_pixels > 0, f"max_pixels: must be > 0, got {self.max_pixels}")
        _require(self.min_side >= 1, f"min_side: must be >= 1, got {self.min_side}")
        _require(self.files_per_task >= 1, f"files_per_task: must be >= 1, got {self.files_per_task}")
        for index, ext in enumerate(self.extensions):
            _require(ext.startswith("."), f"extensions[{index}]: {ext!r} must start with '.'")


@dataclass
class EmbedConfig:
    """How images become L2-normalised vectors.

    ``model: pixels`` (default) is a non-learned thumbnail descriptor (``pixels_size``² × 3, mean-centred
    per channel) that needs no weights; with ``crop_views`` it also stores descriptors of shifted
    crops (and of the mirrored image with ``flip_view``) so dedup tolerates crops and flips. ``model: checkpoint`` loads ``checkpoint`` (our export dir or an
    official hub .pth); ``model: arch`` builds ``arch`` with random init (only useful for plumbing tests).
    """

    model: Literal["pixels", "checkpoint", "arch"] = "pixels"
    checkpoint: str | None = None
    arch: str = "vit_test"
    image_size: int = 224
    pixels_size: int = 12
    crop_views: bool = True
    crop_side: float = 0.95
    crop_grid: int = 3
    flip_view: bool = True
    shard_size: int = 4096
    batch_size: int = 64
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int = 1
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        if self.model == "checkpoint":
            _require(bool(self.checkpoint), "checkpoint: required when model is 'checkpoint'")
        _require(self.image_size >= 14, f"image_size: must be >= 14, got {self.image_size}")
        _require(4 <= self.pixels_size <= 64, f"pixels_size: must be in [4, 64], got {self.pixels_size}")
        _require(0.5 <= self.crop_side < 1.0, f"crop_side: must be in [0.5, 1.0), got {self.crop_side}")
        _require(self.crop_grid >= 2, f"crop_grid: must be >= 2, got {self.crop_grid}")
        _require(self.shard_size >= 1, f"shard_size: must be >= 1, got {self.shard_size}")
        _require(self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}")
        _require(self.torch_threads >= 1, f"torch_threads: must be >= 1, got {self.torch_threads}")


@dataclass
class DedupConfig:
    """Exact (content hash) and near-duplicate removal plus eval-set decontamination.

    Thresholds are cosine similarities of the embeddings; the defaults fit the ``pixels`` descriptor
    (measured in ``bench/bench_dedup.py``). With a copy-detection model (SSCD) the paper used k=64,
    threshold 0.6 and a stricter decontamination threshold of 0.45.
    """

    exact: bool = True
    near: bool = True
    k: int = 64
    threshold: float = 0.93
    # In crowded parts of the descriptor space (featureless sea, sky, plain backgrounds) different
    # images look alike: there the threshold rises by crowding_weight * (crowd - crowding_start), crowd
    # being an image's similarity to its crowding_rank-th nearest image (copies above
    # crowding_ignore_above not counted). 0 turns it off. Measured in bench/bench_dedup.py.
    crowding_rank: int = 8
    crowding_weight: float = 0.5
    crowding_start: float = 0.85
    crowding_ignore_above: float = 0.97
    decontam_threshold: float = 0.9
    index: Literal["auto", "flat", "ivf"] = "auto"
    flat_max: int = 200_000
    ivf_nlist: int = 0  # 0: about 2·sqrt(n)
    ivf_nprobe: int = 16
    use_gpu: Literal["auto", "never", "always"] = "auto"
    query_batch: int = 65_536
    keep: Literal["largest", "first"] = "largest"
    decontam_list_uri: str | None = None
    example_groups: int = 12

    def validate(self) -> None:
        _require(1 <= self.k <= 2048, f"k: must be in [1, 2048], got {self.k}")
        _require(-1.0 <= self.threshold <= 1.0, f"threshold: must be in [-1, 1], got {self.threshold}")
        _require(-1.0 <= self.decontam_threshold <= 1.0, f"decontam_threshold: must be in [-1, 1], got {self.decontam_threshold}")
        _require(self.decontam_threshold <= self.threshold,
                 f"decontam_threshold: must be <= threshold ({self.threshold}) so decontamination is stricter")
        _require(0 <= self.crowding_rank <= self.k, f"crowding_rank: must be in [0, k={self.k}], got {self.crowding_rank}")
        _require(self.crowding_weight >= 0, f"crowding_weight: must be >= 0, got {self.crowding_weight}")
        _require(-1.0 <= self.crowding_start <= 1.0, f"crowding_start: must be in [-1, 1], got {self.crowding_start}")
        _require(-1.0 <= self.crowding_ignore_above <= 1.0,
                 f"crowding_ignore_above: must be in [-1, 1], got {self.crowding_ignore_above}")
        _require(self.ivf_nlist >= 0, f"ivf_nlist: must be >= 0, got {self.ivf_nlist}")
        _require(self.ivf_nprobe >= 1, f"ivf_nprobe: must be >= 1, got {self.ivf_nprobe}")
        _require(self.query_batch >= 1, f"query_batch: must be >= 1, got {self.query_batch}")


@dataclass
class KMeansLevelConfig:
    """One level of hierarchical k-means (recipe §8.1)."""

    n_clusters: int
    n_resampling_steps: int = 1
    sample_size: int = 0  # points per cluster kept for resampling; 0: half the mean cluster size
    n_iters: int = 20

    def validate(self) -> None:
        _require(self.n_clusters >= 1, f"levels[].n_clusters: must be >= 1, got {self.n_clusters}")
        _require(self.n_resampling_steps >= 0, f"levels[].n_resampling_steps: must be >= 0, got {self.n_resampling_steps}")
        _require(self.sample_size >= 0, f"levels[].sample_size: must be >= 0, got {self.sample_size}")
        _require(self.n_iters >= 1, f"levels[].n_iters: must be >= 1, got {self.n_iters}")


@dataclass
class CurateConfig:
    """Retrieval-based curation and/or balanced hierarchical k-means sampling to ``target_size``.

    ``mode``: ``balanced`` (hierarchical k-means + balanced sampling), ``retrieval`` (k nearest pool
    images of each seed image), ``cluster_retrieval`` (sample from the level-1 clusters that seed images
    fall in, balanced), ``retrieval+balanced`` (retrieve, then balance the retrieved set).
    """

    mode: Literal["balanced", "retrieval", "cluster_retrieval", "retrieval+balanced"] = "balanced"
    target_size: int = 1000
    levels: list[KMeansLevelConfig] = field(default_factory=lambda: [
        KMeansLevelConfig(n_clusters=100, n_resampling_steps=3, sample_size=0),
        KMeansLevelConfig(n_clusters=10, n_resampling_steps=3, sample_size=0),
    ])
    resampling_strategy: Literal["closest", "random"] = "closest"
    sampling_strategy: Literal["random", "closest"] = "random"
    retrieval_k: int = 4
    kmeans_init: Literal["kmeans++", "afkmc2", "random"] = "kmeans++"
    spherical: bool = True  # cosine k-means on the unit-norm embeddings; false = the recipe's squared L2
    max_points_per_centroid: int = 100_000
    seed: int = 0
    use_gpu: Literal["auto", "never", "always"] = "auto"

    def validate(self) -> None:
        _require(self.target_size >= 1, f"target_size: must be >= 1, got {self.target_size}")
        _require(len(self.levels) >= 1, "levels: at least one level is required")
        sizes = [level.n_clusters for level in self.levels]
        _require(all(a >= b for a, b in zip(sizes, sizes[1:])),
                 f"levels: n_clusters must not increase from level to level, got {sizes}")
        _require(self.retrieval_k >= 1, f"retrieval_k: must be >= 1, got {self.retrieval_k}")
        _require(self.max_points_per_centroid >= 1, f"max_points_per_centroid: must be >= 1, got {self.max_points_per_centroid}")
