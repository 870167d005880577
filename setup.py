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
    "proxy/datapath/chunk_sizes.py",
    "proxy/datapath/client_connection.py",
    "proxy/datapath/context.py",
    "proxy/datapath/decisions.py",
    "proxy/datapath/fast_path.py",
    "proxy/datapath/flow_control.py",
    "proxy/datapath/forward.py",
    "proxy/datapath/injector.py",
    "proxy/datapath/listener.py",
    "proxy/datapath/message_bounds.py",
    "proxy/datapath/messages.py",
    "proxy/datapath/outcomes.py",
    "proxy/datapath/planning.py",
    "proxy/datapath/replay.py",
    "proxy/datapath/request_body.py",
    "proxy/datapath/routing.py",
    "proxy/datapath/runtime.py",
    "proxy/datapath/speedups.py",
    "proxy/datapath/states.py",
    "proxy/datapath/timeouts.py",
    "proxy/datapath/upstream_connection.py",
    "proxy/datapath/upstream_pool.py",
    "proxy/ops/metrics.py",
    "proxy/tokens/held_token.py",
]


def compiled_extensions() -> list[object]:
    if os.environ.get("TOKEN_PROXY_COMPILE") != "1":
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED_MODULES, opt_level="3", group_name="proxy._data_path"))


setup(ext_modules=compiled_extensions())
