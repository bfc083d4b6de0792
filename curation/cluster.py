"""Dask clusters for the curation stages: a local cluster, an existing scheduler, or Slurm workers."""

from __future__ import annotations

import contextlib
from typing import Iterator

from dinov2_core.utils.config import ConfigError

from curation.config import ClusterConfig


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator["distributed.Client"]:  # noqa: F821
    """A ``distributed.Client`` for ``cfg``; clusters started here are closed on exit."""
    from distributed import Client, LocalCluster

    if cfg.kind == "address":
        with Client(cfg.address) as client:
            yield client
        return
    if cfg.kind == "slurm":
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as err:
            raise ConfigError(
                "cluster.kind: 'slurm' needs the dask-jobqueue package (pip install dask-jobqueue); "
                "allowed without it: ['local', 'address']"
            ) from err
        cluster = SLURMCluster(
            queue=cfg.slurm_queue, account=cfg.slurm_account, walltime=cfg.slurm_walltime,
            cores=cfg.slurm_cores, memory=cfg.slurm_memory, processes=cfg.n_workers,
        )
        cluster.scale(jobs=cfg.slurm_jobs)
    else:
        cluster = LocalCluster(
            n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=cfg.processes,
            memory_limit=cfg.memory_limit, dashboard_address=":0",
        )
    with cluster, Client(cluster) as client:
        yield client
