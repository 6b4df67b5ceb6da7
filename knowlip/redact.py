"""Secrets never leave the process: one redaction step for everything knowlip prints, logs, sends to MLflow or
writes (config.yaml files, checkpoints, the Slurm task's pickle, mlflow.json).

What counts as a secret:
- the value of any key whose name says so (secret, password, token, credential, ...), anywhere in a config;
- under `storage.options` (fsspec arguments), also the credential keys that do not say so (key, aws_access_key_id,
  account_key, ...);
- the user:password part of any URI (http://user:pass@host, s3://key:secret@bucket).
An unresolved interpolation such as `${oc.env:AWS_SECRET_ACCESS_KEY}` is not a secret: it names where the
secret is, and is kept as written so that it resolves where the job runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from typing import Any, Iterator

MASK = "***"
# a key is secret when one of its words (split at _ - .) is one of these, or it is one of the compounds
SECRET_WORDS = {"secret", "password", "passwd", "passphrase", "token", "credential", "credentials", "auth"}
SECRET_COMPOUNDS = {"api_key", "apikey", "private_key", "access_key", "sas_token"}
# fsspec credential arguments whose names do not say "secret" (s3fs, gcsfs, adlfs)
STORAGE_CREDENTIAL_KEYS = {"key", "aws_access_key_id", "account_key", "account_name", "client_id", "username",
                           "user", "profile"}
USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")


def redact_text(text: str) -> str:
    """`text` with the user:password part of every URI in it masked."""
    return USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def is_secret_key(name: str, path: str = "") -> bool:
    """Whether the value under `name` (at dotted `path`, e.g. "storage.options") is a credential."""
    lowered = name.lower()
    if lowered in SECRET_COMPOUNDS or SECRET_WORDS & set(re.split(r"[_\-.]", lowered)):
        return True
    return path.endswith("storage.options") and lowered in STORAGE_CREDENTIAL_KEYS


def is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("${") and value.endswith("}")


def redact_tree(tree: Any, path: str = "") -> Any:
    """A copy of a plain config tree (dicts, lists, scalars) with every secret masked."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            sub = f"{path}.{key}" if path else str(key)
            if is_secret_key(str(key), path) and value is not None and not is_interpolation(value) \
                    and not isinstance(value, (dict, list)):
                out[key] = MASK
            else:
                out[key] = redact_tree(value, sub)
        return out
    if isinstance(tree, list):
        return [redact_tree(v, path) for v in tree]
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def _leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list):
        for value in tree:
            yield from _leaves(value, path)
    else:
        yield path, tree


def literal_secrets(tree: Any) -> list[str]:
    """Dotted keys holding a secret written out (what redaction would mask; an interpolation names where the
    secret is instead), for refusing to ship them to a cluster."""
    return [key for (key, value), (_, masked) in zip(_leaves(tree), _leaves(redact_tree(tree))) if value != masked]


class RedactingFilter(logging.Filter):
    """Masks the user:password part of URIs in a log record's message, whoever logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def redact_logs() -> None:
    """Every record through the root logger's handlers (knowlip's, MLflow's, DeepSpeed's) is redacted."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


@contextlib.contextmanager
def redacted_stdout() -> Iterator[None]:
    """What a library prints meanwhile (MLflow prints run URLs, credentials included) reaches stdout redacted."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        sys.stdout.write(redact_text(buffer.getvalue()))
