"""The ingest/embed/dedup/curate CLI commands run the stages and reject bad configs with exit code 2."""

from __future__ import annotations

import json

from dinov2_pipeline.cli import main


def test_cli_stages(image_folder, tmp_path, capsys):
    root, _ = image_folder
    cluster = ["cluster.processes=false", "cluster.n_workers=1"]
    assert main(["ingest", root, "--output", str(tmp_path / "i"), "max_pixels=100000", *cluster]) == 0
    ingest = json.loads(capsys.readouterr().out)
    assert ingest["num_images"] == 15 and ingest["rejected_by_reason"]["truncated"] == 1
    assert main(["embed", ingest["manifest"], "--output", str(tmp_path / "e"), *cluster]) == 0
    embed = json.loads(capsys.readouterr().out)
    assert main(["dedup", ingest["manifest"], "--embeddings", embed["embeddings"], "--output", str(tmp_path / "d")]) == 0
    dedup = json.loads(capsys.readouterr().out)
    assert dedup["num_input"] == 15
    assert main(["curate", dedup["manifest"], "--embeddings", embed["embeddings"], "--output", str(tmp_path / "c"),
                 "target_size=5", "levels=[{n_clusters: 4}, {n_clusters: 2}]"]) == 0
    assert json.loads(capsys.readouterr().out)["num_selected"] == 5


def test_cli_rejects_bad_config_before_work(tmp_path, capsys):
    assert main(["dedup", "m.parquet", "--embeddings", "e", "--output", str(tmp_path / "d"), "index=hnsw"]) == 2
    assert "index: 'hnsw' is not one of ['auto', 'flat', 'ivf']" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
