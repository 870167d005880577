"""Fixtures for the loader's tests: the files configs refer to, and a scratch directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

pytest.register_assert_rewrite("tests.config.documents")

from tests.config.documents import CACHE_KEY, SECRET, pem  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of the files configs refer to; `FILES/x` in a config names `files/x`."""
    directory = tmp_path_factory.mktemp("files")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    contents = {
        "client-secret": SECRET.encode() + b"\n",
        "assertion.jwt": b"eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
        "empty": b"  \n",
        "rsa.pem": pem(rsa_key),
        "ec.pem": pem(ec.generate_private_key(ec.SECP256R1())),
        "ec384.pem": pem(ec.generate_private_key(ec.SECP384R1())),
        "secp256k1.pem": pem(ec.generate_private_key(ec.SECP256K1())),
        "rsa1024.pem": pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
        "ed25519.pem": pem(ed25519.Ed25519PrivateKey.generate()),
        "encrypted.pem": pem(rsa_key, password=b"pw"),
        "encrypted.der": rsa_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
        # A "key" file that holds the secret: its content must never reach a message.
        "secret-not-a-key.pem": SECRET.encode(),
        "client.crt": b"-----BEGIN CERTIFICATE-----\n",
        "client.key": b"-----BEGIN PRIVATE KEY-----\n",
        "ca.crt": b"-----BEGIN CERTIFICATE-----\n",
        "ca.key": b"-----BEGIN PRIVATE KEY-----\n",
        "inventory-ca.pem": b"-----BEGIN CERTIFICATE-----\n",
        "cache-key": CACHE_KEY,
        "redis-password": b"redis-" + SECRET.encode() + b"\n",
        "redis-ca.pem": b"-----BEGIN CERTIFICATE-----\n",
    }
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    (directory / "subdir").mkdir()
    return directory


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scratch")
