"""Build script: with TOKEN_PROXY_COMPILE=1, the data path is compiled with mypyc.

Everything else about the package is declared in pyproject.toml. A plain
`pip install .` builds pure Python, which runs anywhere. The container image and
`make compile` (used by `make bench` and the second half of `make test`) set
TOKEN_PROXY_COMPILE=1: mypyc turns the modules every request passes through into C
extensions, which removes about 45 % of the instructions per request (see
docs/performance.md). The compiled and the pure-Python build run the same test suite.

Compiling needs mypy, a C compiler and the Python headers, and every dependency
installed (mypyc type-checks the modules against them), so it is done without build
isolation: `TOKEN_PROXY_COMPILE=1 python setup.py build_ext --inplace` in the
project's virtualenv, or `pip wheel --no-build-isolation` in the image's build stage.
"""

from __future__ import annotations

import os

from setuptools import setup

# The modules a request passes through on its way to the upstream and back.
COMPILED_MODULES = [
    "proxy/client_connection.py",
    "proxy/fast_path.py",
    "proxy/flow_control.py",
    "proxy/forward.py",
    "proxy/held_token.py",
    "proxy/listener.py",
    "proxy/messages.py",
    "proxy/metrics.py",
    "proxy/planning.py",
    "proxy/routing.py",
    "proxy/runtime.py",
    "proxy/upstream_pool.py",
]


def compiled_extensions() -> list[object]:
    if os.environ.get("TOKEN_PROXY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED_MODULES, opt_level="3", group_name="proxy._data_path"))


setup(ext_modules=compiled_extensions())
