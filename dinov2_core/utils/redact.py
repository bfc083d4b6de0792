"""Scrub secrets from everything the project writes or prints (configs, run records, MLflow
params and tags, Prefect artifacts, logs).

- :func:`redact` walks nested dicts / lists / tuples / strings: values under secret-like keys
  (``password``, ``token``, ``secret_key``, ``AWS_SECRET_ACCESS_KEY``, …) become ``"***"`` (the key is
  kept), and every string goes through :func:`redact_text`.
- :func:`redact_text` scrubs free text: credentials in URLs (``s3://user:pass@host`` →
  ``s3://***@host``), ``KEY=VALUE`` / ``key: value`` / ``--key value`` / ``Bearer <token>`` forms with a
  secret-like key, and the values of secret environment variables set in this process.
- :class:`RedactingFilter` applies :func:`redact_text` to log records (message, arguments, traceback).

Standard library only, so every layer (``dinov2_core`` included) can use it.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from typing import Any

MASK = "***"

#: Words that make a key secret when they appear as a whole segment of its name
#: (``db_password``, ``secretKey``, ``AWS_SESSION_TOKEN``) — but not ``num_register_tokens``.
SECRET_WORDS = (
    "secret", "password", "passwd", "passphrase", "pwd", "token", "credential", "credentials", "auth",
    "authorization", "apikey", "api_key", "access_key", "secret_key", "private_key", "session_token",
    "client_secret", "signature", "cookie",
)

#: Environment variables whose values are always scrubbed from text (when set, length >= 6).
KNOWN_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
)
MIN_ENV_SECRET_LENGTH = 6
#: Shell variables whose names look secret but hold none (``PWD`` is the working directory, not a password).
NOT_SECRET_ENV = frozenset({"PWD", "OLDPWD"})

_SECRET_KEY = re.compile(r"(?:^|_)(?:" + "|".join(re.escape(w) for w in SECRET_WORDS) + r")(?:$|_)")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/:@]+):(?P<password>[^\s@]+)@")
_VALUE = r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;&}\]\"']+)"
# KEY=VALUE (shell lines, env dumps, query strings), "key": "value" and key: value (JSON, YAML, logs)
_ASSIGNMENT = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)(?P<quote>[\"']?)(?P<sep>\s*[:=]\s*)" + _VALUE)
# --key value and --key=value (command lines)
_OPTION = re.compile(r"(?P<key>--?[A-Za-z][A-Za-z0-9_-]*)(?P<sep>=|\s+)" + _VALUE)
_AUTH_SCHEMES = ("bearer", "basic", "token")  # "Authorization: Bearer ***": the scheme word is not the secret
_BEARER = re.compile(r"\b(?P<scheme>Bearer|Basic|Token)\s+(?P<value>[A-Za-z0-9._~+/=-]{6,})", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """Whether a key or variable name denotes a secret (matched on whole name segments)."""
    normal = _CAMEL.sub("_", str(name).strip("-")).lower().replace("-", "_").replace(".", "_")
    return bool(_SECRET_KEY.search(normal))


def _env_secret_values() -> list[str]:
    values = {value for name, value in os.environ.items()
              if (name in KNOWN_SECRET_ENV or is_secret_key(name)) and name not in NOT_SECRET_ENV
              and len(value) >= MIN_ENV_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: one secret may contain another


def _mask_value(match: re.Match) -> str:
    value = match.group("value")
    if value.startswith(("\"", "'")) and len(value) >= 2:
        return value[0] + MASK + value[-1]
    return MASK


def redact_text(text: str) -> str:
    """``text`` with credentials, secret assignments and secret environment values replaced by ``***``."""
    if not text:
        return text
    for secret in _env_secret_values():
        text = text.replace(secret, MASK)
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)

    def assignment(match: re.Match) -> str:
        value = match.group("value")
        if not is_secret_key(match.group("key")) or value.strip("\"'") == MASK or value.lower() in _AUTH_SCHEMES:
            return match.group(0)
        return match.group("key") + match.group("quote") + match.group("sep") + _mask_value(match)

    def option(match: re.Match) -> str:
        if not is_secret_key(match.group("key")) or match.group("value").startswith("-"):
            return match.group(0)
        return match.group("key") + match.group("sep") + _mask_value(match)

    text = _BEARER.sub(lambda m: f"{m.group('scheme')} {MASK}", text)
    text = _ASSIGNMENT.sub(assignment, text)
    return _OPTION.sub(option, text)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts, lists, tuples, strings, scalars) with secrets replaced by ``***``.

    A value under a secret-like key is masked when it is a string or a number (``None`` and booleans are
    kept: they reveal nothing); containers under such keys are walked like any other.
    """
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if is_secret_key(str(key)) and isinstance(value, (str, int, float)) and not isinstance(value, bool) \
                    and value != "":
                out[key] = MASK
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, list):
        return [redact(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(redact(value) for value in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs each record's message, arguments and traceback with :func:`redact_text`.

    Attach it to handlers (``handler.addFilter(RedactingFilter())``) so records from every logger
    that reaches them are scrubbed. The record is formatted here once, so ``args`` become part of the
    message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True
