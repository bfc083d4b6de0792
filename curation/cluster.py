"""Dask clusters for the curation stages: a local cluster, an existing scheduler, or Slurm workers."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from dinov2_core.utils.config import ConfigError

from curation.config import ClusterConfig


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` for ``cfg``; clusters started here are closed on exit."""
    with _dask_info_logs_silenced():
        from distributed import Client

        if cfg.kind == "address":
            with Client(cfg.address) as client:
                yield client
            return
        with _start_cluster(cfg) as cluster, Client(cluster) as client:
            yield client


def _start_cluster(cfg: ClusterConfig):
    from distributed import LocalCluster

    if cfg.kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as err:
            raise ConfigError(
                "cluster.kind: 'slurm' needs the dask-jobqueue package, in the 'slurm' extra "
                "(pip install -e '.[slurm]' or pip install dask-jobqueue==0.9.0); "
                "allowed without it: ['local', 'address']"
            ) from err
        cluster = SLURMCluster(
            queue=cfg.slurm_queue, account=cfg.slurm_account, walltime=cfg.slurm_walltime,
            cores=cfg.slurm_cores, memory=cfg.slurm_memory, processes=cfg.n_workers,
        )
        cluster.scale(jobs=cfg.slurm_jobs)
        return cluster
    return LocalCluster(
        n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=cfg.processes,
        memory_limit=cfg.memory_limit, dashboard_address=":0",
    )


@contextlib.contextmanager
def _dask_info_logs_silenced() -> Iterator[None]:
    """Cluster start/stop chatter (dozens of INFO lines per stage) would bury the pipeline's own
    progress; warnings and errors still show."""
    import distributed  # noqa: F401  (importing it installs dask's logging config, which we then override)

    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)
