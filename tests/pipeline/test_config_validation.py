"""Pipeline configs are validated completely (every stage's own config too) before anything runs,
and the glue around the launcher / tracking / retries behaves as documented."""

from __future__ import annotations

import errno
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
    from tasks.wiring import load_pipeline_config

    with pytest.raises(ConfigError, match="source: required"):
        load_pipeline_config(DEMO_CONFIG, [f"work_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="eval.val_manifest: required"):
        load_pipeline_config(DEMO_CONFIG, [f"work_dir={tmp_path}", f"source={tmp_path}"])


def test_unreadable_s3_source_is_named_with_its_key(tmp_path, image_set, monkeypatch):
    """No credentials for an s3:// source: the config error names ``source``, not a botocore traceback."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens; no cached filesystem either
    with pytest.raises(ConfigError, match="source: 's3://no-such-bucket/images' cannot be checked: NoCredentialsError"):
        load_tiny_config(tmp_path / "run", image_set, "source=s3://no-such-bucket/images")


def test_cli_rejects_bad_config_before_any_job(tmp_path, image_set, capsys):
    from dinov2_pipeline.cli import main

    args = ["run", str(DEMO_CONFIG), *tiny_overrides(tmp_path / "run", image_set, "launcher.nodes=0")]
    assert main(args) == 2
    assert "launcher.nodes: 0 must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_example_configs_validate(tmp_path, image_set, mlflow_server_uri):
    from tasks.wiring import load_pipeline_config

    root = os.path.dirname(DEMO_CONFIG)
    # the examples name site paths and servers (/shared/..., s3://my-bucket/..., mlflow-host) that the user
    # replaces on the command line, as their header says; a config's inputs and tracking server must be
    # there before a run starts
    site = [f"work_dir={tmp_path / 'run'}", f"source={image_set['train_dir']}",
            f"eval.train_manifest={image_set['train_manifest']}", f"eval.val_manifest={image_set['test_manifest']}",
            f"tracking.uri={mlflow_server_uri}"]
    for name in ("slurm_example.yaml", "vitg14_lvd.yaml"):
        cfg = load_pipeline_config(os.path.join(root, name), site)
        assert cfg.launcher.kind == "slurm"
    big = load_pipeline_config(os.path.join(root, "vitg14_lvd.yaml"), site)
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


def _s3fs_error(code: str, status: int) -> OSError:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "GetObject"))


def test_retry_only_transient_failures():
    from tasks.launch import StageJobFailed, TransientStageError
    from tasks.prefect_task import is_transient

    assert is_transient(TransientStageError("sbatch: socket timed out"))
    assert is_transient(ConnectionError("reset"))
    # what a stage sees of S3 errors: s3fs's translation of botocore's ClientError (the cause is kept)
    assert is_transient(_s3fs_error("SlowDown", 503)) and is_transient(_s3fs_error("InternalError", 500))
    assert not is_transient(_s3fs_error("AccessDenied", 403)) and not is_transient(_s3fs_error("NoSuchKey", 404))
    assert not is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_transient(ConfigError("optim.lr: bad"))
    assert not is_transient(FileNotFoundError("missing manifest"))
    assert not is_transient(ValueError("shape mismatch"))
    assert not is_transient(StageJobFailed("slurm job 7 failed: ...", "RuntimeError: CUDA error"))


def test_params_never_carry_credentials():
    from tasks.tracking import scrub

    secrets = {"aws_secret_access_key": "wJalrXUtnFEMI", "token": "tok-3f9a", "endpoint": "http://user:pw-7c1@host:9000"}
    params = scrub({"s3": secrets, "optim": {"lr": 0.1}})
    # secret values are masked (the key stays, so the run shows that one was set)
    assert params == {"s3.aws_secret_access_key": "***", "s3.token": "***", "s3.endpoint": "http://***@host:9000",
                      "optim.lr": "0.1"}
    assert not any(secret in value for value in params.values() for secret in ("wJalrXUtnFEMI", "tok-3f9a", "pw-7c1"))


def test_completion_record_tracks_inputs_and_outputs(tmp_path):
    """A stage is done iff its identity's record exists and its recorded outputs are intact."""
    from tasks.record import StageResult, StageSpec, current_record, finished, write_record

    manifest = tmp_path / "m.parquet"
    manifest.write_bytes(b"rows")
    root = str(tmp_path / "run" / "embed")

    def spec(batch_size: int = 4) -> StageSpec:
        return StageSpec("embed", {"batch_size": batch_size}, stage_root=root, data_root=root,
                         inputs={"manifest": str(manifest)}, external=("manifest",))

    first = spec()
    assert finished(first) == (None, "no finished result for these inputs")
    os.makedirs(first.output_uri)
    shard = os.path.join(first.output_uri, "shard-00000.npy")
    with open(shard, "wb") as handle:
        handle.write(b"vectors")
    write_record(first, StageResult("embed", first.identity, {"dir": first.output_uri, "embeddings": first.output_uri}))
    done, why_not = finished(spec())
    assert why_not == "" and done.outputs == {"dir": first.output_uri, "embeddings": first.output_uri}
    record = current_record(root)
    assert record["identity"] == first.identity and record["code_version"] and record["parts"] == first.parts()
    assert not [p for p in os.listdir(first.stage_dir) if p.startswith(".tmp")]

    changed = spec(batch_size=8)  # another config is another identity, in its own directory
    assert changed.stage_dir != first.stage_dir and finished(changed)[0] is None

    with open(shard, "ab") as handle:  # an output modified after the stage finished: not done any more
        handle.write(b" and more")
    assert finished(spec()) == (None, f"output embeddings ({first.output_uri}) was modified after the stage finished")

    manifest.write_bytes(b"other rows")  # the same input URI with other content is another identity
    assert spec().identity != first.identity
