"""The secret scrubber: URL credentials, secret keys, shell lines, environment values and log records."""

from __future__ import annotations

import io
import logging

import pytest

from dinov2_core.utils.redact import MASK, RedactingFilter, is_secret_key, redact, redact_text


@pytest.mark.parametrize("name", ["password", "db_password", "AWS_SECRET_ACCESS_KEY", "secretKey", "api-key",
                                  "MLFLOW_TRACKING_TOKEN", "session_token", "auth", "private_key", "credentials",
                                  "PREFECT_API_KEY", "passwd", "Authorization"])
def test_secret_key_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", ["num_register_tokens", "author", "lr", "keep_last", "tokenizer",
                                  "key", "monkey", "arch", "access_log"])
def test_ordinary_key_names(name):
    assert not is_secret_key(name)


def test_mask_token_is_a_model_setting_but_named_like_a_secret():
    # a whole "token" segment is treated as secret; a masked boolean/None would reveal nothing anyway
    assert redact({"mask_token": True, "num_register_tokens": 4}) == {"mask_token": True, "num_register_tokens": 4}


def test_url_credentials_are_removed_and_host_kept():
    assert redact_text("s3://AKIA123:wJalr/xyz@minio:9000/bucket/key") == "s3://***@minio:9000/bucket/key"
    assert redact_text("see http://alice:pa55word@mlflow.local:5000/api") == "see http://***@mlflow.local:5000/api"
    assert redact_text("postgresql+psycopg://u:p%40ss@db/prefect") == "postgresql+psycopg://***@db/prefect"
    assert redact_text("s3://bucket/no/credentials.jpg") == "s3://bucket/no/credentials.jpg"


def test_nested_structures_keep_keys_and_mask_values():
    config = {
        "storage": {"endpoint": "http://key:secretvalue@127.0.0.1:5000", "aws_secret_access_key": "abc123",
                    "token": 12345, "password": None, "use_auth": False},
        "launcher": {"setup": ["export AWS_SECRET_ACCESS_KEY=abcdef", "module load cuda",
                               "export MLFLOW_TRACKING_PASSWORD='hunter22'"]},
        "train": {"lr": 0.001, "arch": "vit_small", "num_register_tokens": 4},
        "args": ("--api-key", "zzz", "--lr", "0.1"),
    }
    out = redact(config)
    assert out["storage"] == {"endpoint": "http://***@127.0.0.1:5000", "aws_secret_access_key": MASK,
                              "token": MASK, "password": None, "use_auth": False}
    assert out["launcher"]["setup"] == ["export AWS_SECRET_ACCESS_KEY=***", "module load cuda",
                                        "export MLFLOW_TRACKING_PASSWORD='***'"]
    assert out["train"] == config["train"]
    assert out["args"] == ("--api-key", "zzz", "--lr", "0.1")  # separate list items carry no key context
    assert config["storage"]["aws_secret_access_key"] == "abc123"  # the input is not modified


def test_shell_lines_options_json_and_headers():
    line = "python train.py --password hunter22 --lr 0.1 --token=abcdef --verbose"
    assert redact_text(line) == "python train.py --password *** --lr 0.1 --token=*** --verbose"
    assert redact_text('{"secret_key": "s3cr3t!", "user": "bob"}') == '{"secret_key": "***", "user": "bob"}'
    assert redact_text("db_password: topsecret\nbatch_size: 64") == "db_password: ***\nbatch_size: 64"
    assert redact_text("curl -H 'Authorization: Bearer eyJhbGciOi.xyz'") == "curl -H 'Authorization: Bearer ***'"
    assert redact_text("GET /api?token=abcdef&page=2") == "GET /api?token=***&page=2"
    assert redact_text("lr=0.001 arch=vit_small") == "lr=0.001 arch=vit_small"


def test_values_of_secret_environment_variables(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-998877")
    monkeypatch.setenv("PREFECT_API_KEY", "short")  # below the minimum length: too common to scrub
    monkeypatch.setenv("HOME_DIRECTORY_NAME", "notasecret")
    text = "failed with key wJalrXUtnFEMI and tok-998877 in notasecret (short)"
    assert redact_text(text) == "failed with key *** and *** in notasecret (short)"
    assert redact({"note": "uses wJalrXUtnFEMI"}) == {"note": "uses ***"}


def test_logging_filter_scrubs_message_arguments_and_traceback(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-1234567")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redact_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("connecting to %s with password=%s", "http://u:p-secret@host", "letmein")
        try:
            raise RuntimeError("login failed for pw-1234567")
        except RuntimeError:
            logger.exception("tracking failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert "connecting to http://***@host with password=***" in output
    assert "login failed for ***" in output and "RuntimeError" in output
    assert "p-secret" not in output and "letmein" not in output and "pw-1234567" not in output


def test_the_working_directory_is_not_a_secret(monkeypatch, tmp_path):
    """``PWD`` matches the secret word ``pwd`` but holds the current directory: paths stay readable."""
    from dinov2_core.utils.redact import redact_text

    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path))
    assert redact_text(f"config: {tmp_path}/configs/x.yaml") == f"config: {tmp_path}/configs/x.yaml"
