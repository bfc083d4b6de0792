"""Curation configs reject bad values before any work, naming the key and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from dinov2_core.utils.config import ConfigError, from_dict, load_config

from curation.config import ClusterConfig, CurateConfig, DedupConfig, EmbedConfig, IngestConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "curation"


def test_literal_values_listed():
    with pytest.raises(ConfigError, match=r"index: 'hnsw' is not one of \['auto', 'flat', 'ivf'\]"):
        from_dict(DedupConfig, {"index": "hnsw"})
    with pytest.raises(ConfigError, match=r"cluster.kind: 'k8s' is not one of"):
        from_dict(IngestConfig, {"cluster": {"kind": "k8s"}})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="decontam_threshold"):
        from_dict(DedupConfig, {"threshold": 0.8, "decontam_threshold": 0.9})
    with pytest.raises(ConfigError, match="checkpoint: required"):
        from_dict(EmbedConfig, {"model": "checkpoint"})
    with pytest.raises(ConfigError, match="n_clusters must not increase"):
        from_dict(CurateConfig, {"levels": [{"n_clusters": 5}, {"n_clusters": 10}]})
    with pytest.raises(ConfigError, match="cluster.address: required"):
        from_dict(ClusterConfig, {"kind": "address"})


def test_unknown_key_and_shipped_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(CurateConfig, {"target": 10})
    cfg = load_config(CurateConfig, CONFIGS / "curate.yaml", ["target_size=7"])
    assert cfg.target_size == 7 and cfg.levels[0].n_clusters >= cfg.levels[1].n_clusters


def test_slurm_cluster_without_dask_jobqueue_is_a_clear_error():
    pytest.importorskip("distributed")
    try:
        import dask_jobqueue  # noqa: F401
        pytest.skip("dask-jobqueue is installed")
    except ImportError:
        pass
    from curation.cluster import dask_client

    with pytest.raises(ConfigError, match="dask-jobqueue"):
        with dask_client(ClusterConfig(kind="slurm")):
            pass
