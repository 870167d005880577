"""The HTTP clients the compatibility suite (tests/clients/) runs, found or installed.

Each helper returns a working client or raises `ToolUnavailable` when this machine
cannot have it (no apt-get, not root, no registry): the suite turns that into a loud
skip that names the reason. A failed install where one should work is an ordinary
error, so a broken CI does not pass silently.

Installs are idempotent and cheap to repeat: a client already installed is used as it
is, and concurrent test runs take a file lock first.

- curl, wget, Go (``golang-go``), Java 17+ (``default-jdk-headless``): Debian packages,
  installed with apt-get (``apt-get update`` first when the package lists are empty or
  stale); needs root.
- Node.js packages (undici, axios, ws, https-proxy-agent): npm, into a per-user cache
  (``~/.cache/token-proxy-tests/node``), never into the project or globally.
- Python clients (httpx, websocket-client): PyPI, into this interpreter's environment
  (they are in the ``test`` extra of pyproject.toml, so usually already there).
- Go programs are compiled once per source text into ``~/.cache/token-proxy-tests/go``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

INSTALL_TIMEOUT_SECONDS = 540
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "token-proxy-tests"

# Major versions the suite's Node programs are written against.
NODE_PACKAGES = {
    "undici": "^7.0.0",  # EnvHttpProxyAgent with the proxyTunnel option, WebSocket
    "axios": "^1.7.0",
    "ws": "^8.18.0",
    "https-proxy-agent": "^7.0.0",  # the proxy agent ws's documentation names
}
MIN_NODE = (20, 18)  # undici 7's engines field
MIN_JAVA = 17


class ToolUnavailable(Exception):
    """This machine cannot provide the client; the message says why and how to get it."""


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    lock_path = Path(tempfile.gettempdir()) / "token-proxy-test-clients.lock"
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _run(
    command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", **(env or {})},
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_SECONDS,
        check=False,
    )


# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------


def _apt_install(package: str, why: str) -> None:
    """`apt-get install package`, refreshing the package lists once if that fails."""
    if shutil.which("apt-get") is None:
        raise ToolUnavailable(
            f"{why} is not installed and there is no apt-get to install {package}"
        )
    if os.geteuid() != 0:
        raise ToolUnavailable(f"{why} is not installed and only root may apt-get install {package}")
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    with _install_lock():
        result = _run(command)
        if result.returncode != 0:
            # Empty or stale package lists (a new machine): refresh them once.
            update = _run(["apt-get", "update", "-q"])
            if update.returncode != 0:
                raise ToolUnavailable(
                    f"{why}: apt-get update failed (no package repository reachable?):\n"
                    f"{update.stdout}{update.stderr}"
                )
            result = _run(command)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get install {package} failed:\n{result.stdout}{result.stderr}")


def _debian_binary(name: str, package: str, extra_paths: tuple[str, ...] = ()) -> Path:
    def locate() -> Path | None:
        found = shutil.which(name)
        if found is not None:
            return Path(found)
        for candidate in extra_paths:
            if Path(candidate).exists():
                return Path(candidate)
        return None

    located = locate()
    if located is None:
        _apt_install(package, name)
        located = locate()
    if located is None:
        raise RuntimeError(f"apt-get installed {package} but there is no {name}")
    return located


@functools.cache
def curl() -> Path:
    return _debian_binary("curl", "curl")


@functools.cache
def wget() -> Path:
    return _debian_binary("wget", "wget")


@functools.cache
def go() -> Path:
    """The `go` command (Debian's golang-go puts it in /usr/lib/go/bin and /usr/bin)."""
    return _debian_binary("go", "golang-go", ("/usr/lib/go/bin/go",))


@functools.cache
def java() -> Path:
    """A `java` launcher of version 17 or later that can run single-file source programs."""
    found = shutil.which("java")
    if found is None or _java_version(Path(found)) < MIN_JAVA or not _has_compiler(Path(found)):
        _apt_install("default-jdk-headless", f"Java {MIN_JAVA}+ with its compiler")
        found = shutil.which("java")
    if found is None:
        raise RuntimeError("apt-get installed default-jdk-headless but there is no java")
    version = _java_version(Path(found))
    if version < MIN_JAVA:
        raise ToolUnavailable(f"java is version {version}; java.net.http needs {MIN_JAVA}+")
    if not _has_compiler(Path(found)):
        raise ToolUnavailable(f"{found} has no jdk.compiler module (a JRE, not a JDK)")
    return Path(found)


def keytool() -> Path:
    path = java().resolve().parent / "keytool"
    if not path.exists():
        raise ToolUnavailable(f"there is no keytool beside {java().resolve()}")
    return path


def _java_version(launcher: Path) -> int:
    result = _run([str(launcher), "-version"])
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr)
    if match is None:
        return 0
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _has_compiler(launcher: Path) -> bool:
    result = _run([str(launcher), "--list-modules"])
    return "jdk.compiler@" in result.stdout


# ---------------------------------------------------------------------------
# Node.js
# ---------------------------------------------------------------------------


@functools.cache
def node() -> Path:
    """`node`, at least MIN_NODE (Debian's nodejs package if there is none)."""
    found = shutil.which("node")
    if found is None:
        _apt_install("nodejs", "node")
        found = shutil.which("node")
    if found is None:
        raise RuntimeError("apt-get installed nodejs but there is no node")
    version = _run([found, "--version"]).stdout.strip().lstrip("v")
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if parts < MIN_NODE:
        raise ToolUnavailable(
            f"node {version} is too old for undici 7 (needs "
            f"{'.'.join(map(str, MIN_NODE))}+): install a newer Node.js"
        )
    return Path(found)


@functools.cache
def node_modules() -> Path:
    """A node_modules folder with NODE_PACKAGES, installed by npm into the test cache."""
    node()
    npm = shutil.which("npm")
    if npm is None:
        _apt_install("npm", "npm")
        npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("apt-get installed npm but there is no npm")
    prefix = CACHE_DIR / "node"
    manifest = {"name": "token-proxy-client-tests", "private": True, "dependencies": NODE_PACKAGES}
    wanted = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    stamp = prefix / ".installed"
    if stamp.exists() and stamp.read_text() == wanted:
        return prefix / "node_modules"
    with _install_lock():
        if not (stamp.exists() and stamp.read_text() == wanted):
            prefix.mkdir(parents=True, exist_ok=True)
            (prefix / "package.json").write_text(wanted)
            result = _run(
                [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix)],
                cwd=prefix,
            )
            if result.returncode != 0:
                raise ToolUnavailable(
                    f"npm install into {prefix} failed (no npm registry reachable?):\n"
                    f"{result.stdout}{result.stderr}"
                )
            stamp.write_text(wanted)
    return prefix / "node_modules"


# ---------------------------------------------------------------------------
# Go programs
# ---------------------------------------------------------------------------


def go_program(source: str, name: str) -> Path:
    """`source` (one `package main` file, standard library only) compiled once into the cache."""
    compiler = go()
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    binary = CACHE_DIR / "go" / "bin" / f"{name}-{digest}"
    if binary.exists():
        return binary
    with _install_lock():
        if not binary.exists():
            binary.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as work:
                main = Path(work) / "main.go"
                main.write_text(source)
                partial = binary.with_name(binary.name + ".partial")
                env = {
                    "GOCACHE": str(CACHE_DIR / "go" / "build-cache"),
                    "GOPATH": str(CACHE_DIR / "go" / "path"),
                    "GO111MODULE": "off",  # one file, standard library only: no module
                    "GOFLAGS": "",
                    "CGO_ENABLED": "0",
                }
                result = _run([str(compiler), "build", "-o", str(partial), str(main)], env=env)
                if result.returncode != 0:
                    raise RuntimeError(f"go build {name} failed:\n{result.stdout}{result.stderr}")
                partial.rename(binary)
    return binary


# ---------------------------------------------------------------------------
# Python clients
# ---------------------------------------------------------------------------


def python_module(module: str, package: str) -> ModuleType:
    """`module`, pip-installing `package` into this environment if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    with _install_lock():
        result = _run([sys.executable, "-m", "pip", "install", "--quiet", package])
    if result.returncode != 0:
        raise ToolUnavailable(
            f"pip install {package} failed (no package index reachable?):\n"
            f"{result.stdout}{result.stderr}"
        )
    importlib.invalidate_caches()
    return importlib.import_module(module)
