"""Every user error in a pipeline config is rejected by the CLI before any work: exit status 2, one line
naming the key (and the expected value), no traceback, nothing written to the run directory."""

from __future__ import annotations

import os
import textwrap

from tests.pipeline.conftest import DEMO_CONFIG, REPO_ROOT, tiny_overrides

TRAIN = REPO_ROOT / "configs" / "train"


def _write(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def _cases(tmp_path, image_set, s3_bucket):
    """(name, config file or None for demo.yaml, extra overrides, expected message)."""
    # a parent config in another directory names its recipes relative to itself
    parent_dir = tmp_path / "shared" / "pipelines"
    parent_dir.mkdir(parents=True)
    (tmp_path / "shared" / "train").mkdir()
    for name in ("base_ssl", "tiny_pretrain", "tiny_highres", "tiny_distill"):
        (tmp_path / "shared" / "train" / f"{name}.yaml").write_text((TRAIN / f"{name}.yaml").read_text())
    parent = _write(parent_dir / "base.yaml", f"""\
        defaults: [{DEMO_CONFIG}]
        pretrain: {{config: ../train/tiny_pretrain.yaml}}
        highres: {{config: ../train/tiny_highres.yaml}}
        distill: {{config: ../train/tiny_distill.yaml}}
        """)
    return [
        ("yaml syntax", _write(tmp_path / "syntax.yaml", "name: [unclosed\nsource: x\n"), [], "syntax.yaml:2:7: YAML syntax error"),
        ("duplicate key", _write(tmp_path / "dup.yaml", "name: a\nname: b\n"), [], "duplicate key 'name'"),
        ("missing config file", str(tmp_path / "nope.yaml"), [], "nope.yaml"),
        ("unknown key", None, ["launcher.gpus=2"], "launcher.gpus: unknown key"),
        ("bad value", None, ["launcher.kind=pbs"], "launcher.kind: 'pbs' is not one of ['local', 'slurm']"),
        ("missing source", None, [f"source={tmp_path}/no-images"], "source: "),
        ("missing test set", None, [f"eval.val_manifest={tmp_path}/no-test.parquet"], "eval.val_manifest: "),
        ("missing train set", None, [f"eval.train_manifest={tmp_path}/no-train.parquet"], "eval.train_manifest: "),
        ("missing bucket", None, ["source=s3://no-such-bucket-dinov2/images"], "source: 's3://no-such-bucket-dinov2/images'"),
        ("unreachable tracking server", None, ["tracking.uri=http://127.0.0.1:9"], "tracking.uri: http://127.0.0.1:9 is not reachable"),
        ("patch sizes clash", None, ["highres.overrides=[student.patch_size=4, crops.global_crops_size=32, "
                                     "crops.local_crops_size=16]"], "highres.config: student"),
        ("distill patch clash", None, ["distill.overrides=[student.patch_size=4, crops.global_crops_size=32, "
                                       "crops.local_crops_size=16]"], "distill.config: student.patch_size 4"),
        ("warm start without a previous result", None, ["pretrain.init=previous"],
         "pretrain.init: 'previous' needs a finished pretrain result"),
        ("missing init_from of a recipe", None, ["pretrain.enabled=false", f"highres.overrides=[init_from={tmp_path}/no-ckpt]"],
         "highres (init_from): "),
        ("valid: recipes relative to a defaults parent", _write(tmp_path / "child.yaml", f"defaults: [{parent}]\n"), [], None),
    ]


def test_every_bad_config_is_rejected_before_any_work(tmp_path, image_set, s3_bucket, capsys):
    from dinov2_pipeline.cli import main

    wrong = []
    for name, config, extra, message in _cases(tmp_path, image_set, s3_bucket):
        work_dir = tmp_path / "runs" / name.replace(" ", "-").replace(":", "")
        overrides = tiny_overrides(work_dir, image_set, *extra)
        # the error cases stop before any work; the valid one is only planned
        code = main(["run", config or str(DEMO_CONFIG), *overrides, *(["--dry-run"] if message is None else [])])
        captured = capsys.readouterr()
        if message is None:
            if code != 0:
                wrong.append(f"{name}: rejected: {captured.err}")
        elif code != 2 or message not in captured.err or "Traceback" in captured.err + captured.out \
                or captured.err.count("\n") != 1 or os.path.exists(work_dir):
            wrong.append(f"{name}: exit {code}, wrote {os.path.exists(work_dir)}: {captured.err[-600:]}")
    assert not wrong, "\n".join(wrong)


def test_cli_stage_commands_check_their_inputs(tmp_path, capsys):
    from dinov2_pipeline.cli import main

    assert main(["ingest", str(tmp_path / "no-images"), "--output", str(tmp_path / "out")]) == 2
    assert "source: " in capsys.readouterr().err
    assert main(["train", str(TRAIN / "tiny_pretrain.yaml"), "--output-dir", str(tmp_path / "train"),
                 f"train.dataset={tmp_path}/none.parquet"]) == 2
    err = capsys.readouterr().err
    assert "train.dataset: " in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "train").exists()
