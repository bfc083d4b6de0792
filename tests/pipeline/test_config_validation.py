"""Pipeline configs are validated completely (every stage's own config too) before anything runs,
and the glue around the launcher / tracking / retries behaves as documented."""

from __future__ import annotations

import os

import pytest

from dinov2_core.utils.config import ConfigError
from tests.pipeline.conftest import DEMO_CONFIG, load_tiny_config, tiny_overrides


@pytest.mark.parametrize(
    "override, message",
    [
        ("launcher.kind=pbs", "launcher.kind: 'pbs' is not one of ['local', 'slurm']"),
        ("launcher.gpus=2", "launcher.gpus: unknown key; allowed keys are"),
        ("launcher.stages={report: {nodes: 2}}", "launcher.stages.report: not a stage that runs through the launcher"),
        ("work_dir=s3://bucket/run", "work_dir: 's3://bucket/run' must be a filesystem path"),
        ("dedup.options.threshold=2.0", "dedup.options.threshold: must be in [-1, 1]"),
        ("embed.options.model=resnet", "embed.options.model: 'resnet' is not one of ['pixels', 'checkpoint', 'arch']"),
        ("pretrain.overrides=[crops.global_crops_size=33]", "crops.global_crops_size: 33 is not a multiple of student.patch_size=8"),
        ("highres.config=../train/tiny_pretrain.yaml", "highres.config: recipe"),
        ("eval.backbones=[distill, teacher]", "eval.backbones[1]: 'teacher' is not one of ['pretrain', 'highres', 'distill']"),
        ("eval.options.evals=[knn, fid]", "eval.options.evals[1]: 'fid' is not one of"),
        ("distill.enabled=false", "eval.backbones: 'distill' is disabled"),
        ("embed.enabled=false", "embed.enabled: dedup needs embeddings"),
    ],
)
def test_bad_config_names_key_and_allowed_values(tmp_path, image_set, override, message):
    with pytest.raises(ConfigError) as err:
        load_tiny_config(tmp_path / "run", image_set, override)
    assert message in str(err.value)
    assert not (tmp_path / "run").exists(), "nothing may be written before the config is valid"


def test_missing_required_keys(tmp_path):
    from tasks.config import load_pipeline_config

    with pytest.raises(ConfigError, match="source: required"):
        load_pipeline_config(DEMO_CONFIG, [f"work_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.val_manifest: required"):
        load_pipeline_config(DEMO_CONFIG, [f"work_dir={tmp_path}", f"source={tmp_path}"])


def test_cli_rejects_bad_config_before_any_job(tmp_path, image_set, capsys):
    from dinov2_pipeline.cli import main

    args = ["run", str(DEMO_CONFIG), *tiny_overrides(tmp_path / "run", image_set, "launcher.nodes=0")]
    assert main(args) == 2
    assert "launcher.nodes: 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_example_configs_validate(tmp_path):
    from tasks.config import load_pipeline_config

    root = os.path.dirname(DEMO_CONFIG)
    for name in ("slurm_example.yaml", "vitg14_lvd.yaml"):
        cfg = load_pipeline_config(os.path.join(root, name))
        assert cfg.launcher.kind == "slurm"
    big = load_pipeline_config(os.path.join(root, "vitg14_lvd.yaml"))
    assert big.launcher.resources_for("pretrain").nodes == 12
    assert big.launcher.resources_for("distill").nodes == 4
    assert big.launcher.resources_for("distill").gpus_per_node == 8


def test_slurm_parameters_come_from_the_config(tmp_path, image_set):
    from tasks.launch import SlurmLauncher

    cfg = load_tiny_config(tmp_path, image_set, "launcher.kind=slurm", "launcher.partition=gpu", "launcher.account=proj",
                           "launcher.qos=high", "launcher.gpus_per_node=8", "launcher.tasks_per_node=8",
                           "launcher.mem_gb=400", "launcher.constraint=h100", "launcher.additional={exclusive: true}",
                           "launcher.stages={eval: {gpus_per_node: 1, tasks_per_node: 1}}")
    launcher = SlurmLauncher(cfg.launcher)
    params = launcher.parameters("run-pretrain", cfg.launcher.resources_for("pretrain"))
    assert params["slurm_partition"] == "gpu" and params["slurm_account"] == "proj" and params["slurm_qos"] == "high"
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["mem_gb"] == 400
    assert params["slurm_constraint"] == "h100" and params["slurm_additional_parameters"] == {"exclusive": True}
    eval_params = launcher.parameters("run-eval", cfg.launcher.resources_for("eval"))
    assert eval_params["gpus_per_node"] == 1 and eval_params["tasks_per_node"] == 1
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="debug")
    executor.update_parameters(**{k: v for k, v in params.items() if not k.startswith("slurm_")})  # valid names


def test_stage_job_requeues_a_fresh_copy():
    import submitit.helpers

    from tasks.launch import StageJob

    job = StageJob("tasks.training:execute", {"config": {}, "inputs": {}, "output_uri": "/x", "stage_dir": "/x"}, True)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, StageJob) and delayed.function is not job
    assert delayed.function.kwargs == job.kwargs and delayed.function.distributed


def test_retry_only_transient_failures():
    from tasks.stage import TransientStageError, is_transient

    assert is_transient(TransientStageError("sbatch: socket timed out"))
    assert is_transient(ConnectionError("reset"))
    assert is_transient(OSError(5, "S3 slow down"))
    assert not is_transient(ConfigError("optim.lr: bad"))
    assert not is_transient(FileNotFoundError("missing manifest"))
    assert not is_transient(ValueError("shape mismatch"))


def test_params_never_carry_credentials():
    from tasks.tracking import scrub

    params = scrub({"s3": {"aws_secret_access_key": "x", "token": "y", "endpoint": "http://user:pw@host:9000"},
                    "optim": {"lr": 0.1}})
    assert params == {"s3.endpoint": "http://***@host:9000", "optim.lr": "0.1"}


def test_success_manifest_tracks_inputs(tmp_path):
    from tasks.stage import StageSpec, finished_result, read_success, write_success

    spec = StageSpec("embed", str(tmp_path), {"batch_size": 4}, {"manifest": "m.parquet"}, str(tmp_path))
    assert finished_result(spec) is None
    write_success(spec, {"outputs": {"dir": str(tmp_path)}}, [str(tmp_path)])
    assert finished_result(spec) == {"outputs": {"dir": str(tmp_path)}}
    assert read_success(str(tmp_path))["code_version"]
    changed = StageSpec("embed", str(tmp_path), {"batch_size": 8}, {"manifest": "m.parquet"}, str(tmp_path))
    assert finished_result(changed) is None
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
