"""YAML config loading: syntax errors and duplicate keys name file, line and column; ``defaults``
parents resolve relative to their own file and report where each key came from."""

from __future__ import annotations

import os

import pytest

from dinov2_core.utils.config import ConfigError, load_yaml


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  lr: 0.1\n  batch_size: [64, 128\nmodel:\n  arch: vit_small\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4:") and "YAML syntax error" in message
    assert "Traceback" not in message


def test_tab_indentation_is_a_syntax_error_with_position(tmp_path):
    path = write(tmp_path / "tabs.yaml", "train:\n\tlr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2:1: YAML syntax error"):
        load_yaml(path)


def test_duplicate_key_is_rejected_with_both_lines(tmp_path):
    path = write(tmp_path / "dup.yaml", "train:\n  lr: 0.1\n  batch_size: 64\n  lr: 0.2\nmodel: {arch: vit_small}\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert str(err.value) == f"{path}:4:3: duplicate key 'lr' (first defined at line 2)"
    top = write(tmp_path / "dup_top.yaml", "model: {arch: a}\nmodel: {arch: b}\n")
    with pytest.raises(ConfigError, match=r"dup_top.yaml:2:1: duplicate key 'model'"):
        load_yaml(top)


def test_same_key_in_different_sections_and_merge_keys_are_fine(tmp_path):
    path = write(tmp_path / "ok.yaml", "base: &base {lr: 0.1, wd: 0.04}\n"
                                       "student: {<<: *base, lr: 0.2}\nteacher: {lr: 0.3}\n")
    data = load_yaml(path)
    assert data["student"] == {"lr": 0.2, "wd": 0.04} and data["teacher"] == {"lr": 0.3}


def test_missing_files_and_bad_defaults(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file '{missing}' does not exist"):
        load_yaml(missing)
    child = write(tmp_path / "child.yaml", "defaults: [base/missing.yaml]\nlr: 1\n")
    with pytest.raises(ConfigError, match=r"child.yaml: defaults: 'base/missing.yaml' does not exist"):
        load_yaml(child)
    scalar = write(tmp_path / "scalar.yaml", "- just\n- a list\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping, got list"):
        load_yaml(scalar)
    a = write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="defaults form a cycle"):
        load_yaml(a)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8"):
        load_yaml(tmp_path / "latin1.yaml")


def test_origins_name_the_file_that_set_each_key(tmp_path):
    # recipes/base/pipeline.yaml names ../train/x.yaml relative to itself; the child lives elsewhere
    base_dir = tmp_path / "recipes" / "base"
    write(base_dir / "pipeline.yaml", "pretrain:\n  config: ../train/x.yaml\n  resume: true\n"
                                      "eval:\n  config: eval.yaml\nsection: {a: 1, b: 2}\n")
    child_dir = tmp_path / "runs" / "exp1"
    child = write(child_dir / "pipeline.yaml", "defaults: [../../recipes/base/pipeline.yaml]\n"
                                               "eval:\n  config: my_eval.yaml\nsection: 3\n")
    data, origins = load_yaml(child, with_origins=True)
    assert data["pretrain"] == {"config": "../train/x.yaml", "resume": True}
    assert data["eval"] == {"config": "my_eval.yaml"} and data["section"] == 3
    assert origins["pretrain.config"] == str(base_dir)
    assert origins["eval.config"] == str(child_dir)
    assert origins["pretrain"] == str(base_dir) and origins["eval"] == str(child_dir)
    assert "section.a" not in origins and origins["section"] == str(child_dir)
    resolved = os.path.normpath(os.path.join(origins["pretrain.config"], data["pretrain"]["config"]))
    assert resolved == str(tmp_path / "recipes" / "train" / "x.yaml")
    assert load_yaml(child) == data
