"""What the benchmark needs outside the project, installed when missing.

nginx (the origin and the baseline), wrk (the load generator), curl (large bodies)
and taskset (pinning) come from Debian's packages; matplotlib (only for `--plot`)
from PyPI into the running virtualenv. A missing plot library is not fatal.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

# Debian package providing each command.
COMMANDS = {"nginx": "nginx-light", "wrk": "wrk", "curl": "curl", "taskset": "util-linux"}
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def _put_sbin_on_path() -> None:
    # nginx lives in /usr/sbin, which a non-login shell's PATH may leave out.
    path = os.environ.get("PATH", "").split(os.pathsep)
    missing = [directory for directory in SBIN_DIRS if directory not in path]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*path, *missing])


def missing_commands(commands: dict[str, str] = COMMANDS) -> list[str]:
    _put_sbin_on_path()
    return [command for command in commands if shutil.which(command) is None]


def ensure_commands(commands: dict[str, str] = COMMANDS) -> None:
    """Install `commands` (command -> Debian package; by default nginx, wrk, curl and
    taskset) with apt-get if any is not on PATH."""
    missing = missing_commands(commands)
    if not missing:
        return
    packages = sorted({commands[command] for command in missing})
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise SystemExit(
                f"bench: missing {', '.join(missing)}; install with "
                f"`apt-get install -y {' '.join(packages)}` as root"
            )
        prefix = ["sudo"]
    print(f"bench: installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, "apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(
        [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        check=True,
        env=env,
    )
    still_missing = missing_commands(commands)
    if still_missing:
        raise SystemExit(f"bench: still missing after apt-get: {', '.join(still_missing)}")


def ensure_matplotlib() -> bool:
    """Import matplotlib, pip-installing it first if needed; False (with a message) if not."""
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        pass
    print("bench: installing matplotlib for the plot", flush=True)
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=False
    )
    importlib.invalidate_caches()
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        print(
            f"bench: matplotlib could not be installed (pip exit {installed.returncode}); "
            "skipping the plot",
            flush=True,
        )
        return False
