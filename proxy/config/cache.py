"""The fleet token cache section (`token_cache`): Redis, and the key its entries are sealed with.

Owns how the Redis (or Valkey) server is reached (`redis.url` without credentials,
`username`, `password_file`, `ca_file` for `rediss://`), the encryption key file (at
least `MIN_ENCRYPTION_KEY_BYTES` of content, the same file on every replica: what
counts as its content is `encryption_key_material()`, for the loader and the cache
alike), the key prefix and the lock timeout. Files are checked here and read again by
the cache at use; their contents are never stored in the config or shown in a message.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from proxy.config.model import RedisConfig, TokenCacheConfig
from proxy.config.scalars import duration
from proxy.config.source import KeyPath, Reader, yaml_keys
from proxy.config.urls import redis_url

__all__ = ["MIN_ENCRYPTION_KEY_BYTES", "encryption_key_material", "token_cache"]

MIN_ENCRYPTION_KEY_BYTES = 32
_CACHE_KEYS = yaml_keys(TokenCacheConfig)
_REDIS_KEYS = yaml_keys(RedisConfig)


def encryption_key_material(data: bytes) -> bytes:
    """The contents of an encryption key file that count: without one trailing newline.

    `openssl rand -base64 32 > key` and `kubectl create secret --from-file` both leave
    one line; the newline is no part of the key, so editors that add or drop it do not
    change the key every replica derives.
    """
    if data.endswith(b"\r\n"):
        return data[:-2]
    if data.endswith(b"\n"):
        return data[:-1]
    return data


def token_cache(reader: Reader, path: KeyPath, value: object) -> TokenCacheConfig:
    section = reader.section(path, value, _CACHE_KEYS)
    redis = section.required("redis", _redis)
    encryption_key_file = section.required("encryption_key_file", _encryption_key_file)
    defaults = TokenCacheConfig(redis=redis, encryption_key_file=encryption_key_file)
    return TokenCacheConfig(
        redis=redis,
        encryption_key_file=encryption_key_file,
        key_prefix=section.with_default("key_prefix", _key_prefix, defaults.key_prefix),
        lock_timeout=section.with_default("lock_timeout", duration, defaults.lock_timeout),
    )


def _redis(reader: Reader, path: KeyPath, value: object) -> RedisConfig:
    section = reader.section(path, value, _REDIS_KEYS)
    url = section.required("url", redis_url)
    ca_file = section.optional("ca_file", Reader.file)
    if ca_file is not None and urllib.parse.urlsplit(url).scheme != "rediss":
        section.fail("ca_file", "only used with a rediss:// url (Redis over TLS)")
    return RedisConfig(
        url=url,
        username=section.optional("username", Reader.string),
        password_file=section.optional("password_file", Reader.secret_file),
        ca_file=ca_file,
    )


def _encryption_key_file(reader: Reader, path: KeyPath, value: object) -> Path:
    file_path = reader.file(path, value)
    key = encryption_key_material(reader.read_file(path, file_path))
    if len(key) < MIN_ENCRYPTION_KEY_BYTES:
        # Not how much shorter: the message says nothing about the key but that it is short.
        reader.fail(
            path,
            f"the key is shorter than {MIN_ENCRYPTION_KEY_BYTES} bytes "
            "(make one with: openssl rand -base64 32)",
        )
    return file_path


def _key_prefix(reader: Reader, path: KeyPath, value: object) -> str:
    text = reader.string(path, value)
    if any(char.isspace() or not char.isprintable() for char in text):
        reader.fail(path, "must not contain whitespace or control characters")
    return text
