"""Config documents for the loader's tests: a small valid config, edits of it, and cases.

`base_config()` is the smallest valid config with one upstream; `edited()` applies
`dotted.path: value` edits to a copy (`DELETE` removes a key); `write()` saves it with
`FILES/x` resolved to the `files` fixture's directory (tests/config/conftest.py).
`Case` is one refusal, and `assert_problem()` checks that the loader reports it with
the exact file, key path and problem, and without the secret.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from proxy.config import ConfigError, load_config

SECRET = "hunter2-Sup3r-Secret-Value"
ENV = {"CLIENT_SECRET": SECRET, "ORDER_CLIENT": "order-service", "EMPTY": ""}
DELETE = object()
# What `openssl rand -base64 32` writes: 44 characters and a newline.
CACHE_KEY = base64.b64encode(bytes(range(32))) + b"\n"

UP = "upstreams.inventory"
TOKEN = "upstreams.inventory.token"
SECOND_UPSTREAM = {
    "match": {"hosts": ["billing.internal"]},
    "token": {
        "token_url": "https://auth.example.com/oauth/token",
        "client_id": "order-service",
        "client_secret": "${CLIENT_SECRET}",
    },
}


def pem(key: Any, password: bytes | None = None) -> bytes:
    """`key` as unencrypted (or, with `password`, encrypted) PKCS#8 PEM."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return data


def der(key: Any) -> bytes:
    """`key` as unencrypted PKCS#8 DER."""
    data: bytes = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def base_config() -> dict[str, Any]:
    """The smallest valid config with one upstream; cases edit a copy of it."""
    return {
        "upstreams": {
            "inventory": {
                "match": {"hosts": ["inventory.internal"]},
                "token": {
                    "token_url": "https://auth.example.com/oauth/token",
                    "client_id": "order-service",
                    "client_secret_file": "FILES/client-secret",
                },
            }
        }
    }


def _resolve_files(value: Any, files: Path) -> Any:
    if isinstance(value, str):
        return value.replace("FILES/", f"{files}/")
    if isinstance(value, list):
        return [_resolve_files(item, files) for item in value]
    if isinstance(value, dict):
        return {key: _resolve_files(item, files) for key, item in value.items()}
    return value


def edited(edits: dict[str, object]) -> dict[str, Any]:
    """`base_config()` with `dotted.path: value` edits applied (`DELETE` removes a key)."""
    document = base_config()
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node = document
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return document


def write(directory: Path, document: object, files: Path, name: str = "proxy.yaml") -> Path:
    path = directory / name
    text = yaml.safe_dump(_resolve_files(document, files), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def second(**changes: object) -> dict[str, Any]:
    """A second upstream, `billing`, with `changes`."""
    upstream = copy.deepcopy(SECOND_UPSTREAM)
    upstream.update(changes)
    return upstream


@dataclass(frozen=True)
class Case:
    """One refusal: the edits of `base_config()`, and where and what the loader says."""

    id: str
    edits: dict[str, object]
    key_path: str
    problem: str


def assert_problem(case: Case, directory: Path, files: Path) -> None:
    """Loading `case`'s document fails with exactly its file, key path and problem."""
    path = write(directory, edited(case.edits), files)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    error = caught.value
    expected_problem = case.problem.replace("FILES/", f"{files}/").replace("FILES", str(files))
    assert (error.file, error.key_path, error.problem) == (
        str(path),
        case.key_path,
        expected_problem,
    )
    assert str(error) == f"{path}: {case.key_path}: {expected_problem}"
    assert SECRET not in str(error)
