"""Instructions per request on the fast path, counted by valgrind: a noise-free measure.

Timings on a shared 2-core VM move by 10-30 % from run to run; instruction counts do
not. This drives token-proxy's real protocol objects (client connection, forwarder,
fast path, upstream connection, metrics) with in-memory transports, so no system
call is made, and counts the CPU instructions one request and its response take:
valgrind's callgrind counts two runs of different lengths, and the difference,
divided by the difference in requests, leaves out start-up and shutdown.

    .venv/bin/python -m bench.instructions            # both modes, about 2 minutes
    .venv/bin/python -m bench.instructions --mode reverse

It measures whichever data path the tree holds (`make compile` / `make uncompile`);
the first line of its output says which. The request is wrk's with two more fields,
the response nginx's for a 1 KiB body. valgrind is installed with apt-get if missing.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import uvloop

from bench.prerequisites import ensure_commands
from proxy import data_path_build
from proxy.config import (
    Address,
    HostMatch,
    MatchConfig,
    ProxyConfig,
    Secret,
    TargetUrl,
    TokenConfig,
    UpstreamConfig,
)
from proxy.datapath.client_connection import ClientConnection
from proxy.datapath.forward import Forwarder
from proxy.datapath.listener import Listener
from proxy.datapath.runtime import Runtime, RuntimeHolder
from proxy.datapath.tunnel import TunnelHandler
from proxy.datapath.upstream_connection import UpstreamConnection
from proxy.datapath.upstream_pool import UpstreamPool
from proxy.ops.metrics import Metrics
from proxy.tokens.held_token import HeldToken

HOST = b"inventory.internal"
TOKEN = "t" * 64
REQUEST = b"GET %s HTTP/1.1\r\nHost: inventory.internal\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 20:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Wed, 25 Nov 2026 19:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6925f9d0-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"a" * 1024
)
SHORT, LONG = 1_000, 3_000


class MemoryTransport:
    """Just enough of a transport for the protocols: writes are kept, not sent."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class FixedToken:
    """A token provider that always holds a valid token."""

    def __init__(self) -> None:
        self.held = HeldToken(time.monotonic)
        self.held.hold(TOKEN, math.inf)
        self.dpop = None  # bearer tokens

    def current(self) -> str:
        return TOKEN

    async def get(self) -> str:
        return TOKEN

    def invalidate(self, token: str) -> None:
        pass


def bench_config() -> ProxyConfig:
    """One upstream, `inventory`, with a reverse port and a url nothing listens on
    (its connection is an in-memory one put into the pool)."""
    upstream = UpstreamConfig(
        name="inventory",
        match=MatchConfig((HostMatch(HOST.decode()),)),
        token=TokenConfig(
            client_id="c", token_url="http://127.0.0.1:9/token", client_secret=Secret("s")
        ),
        url=TargetUrl("http", "127.0.0.1", 8080),
        listen=Address("127.0.0.1", 0),
    )
    return ProxyConfig(
        upstreams=(upstream,),
        listen=Address("127.0.0.1", 0),
        admin_listen=Address("127.0.0.1", 0),
    )


def relay(config: ProxyConfig, provider: Any, mode: str, requests: int, token: str) -> None:
    """Relay `requests` requests through the fast path of a `mode` port, in memory, with
    `provider`'s token; then check one went the whole way."""
    metrics = Metrics()
    holder = RuntimeHolder(Runtime.build(config, {"inventory": provider}))
    pool = UpstreamPool()
    forwarder = Forwarder(holder, pool, metrics, TunnelHandler(holder, metrics))
    if mode == "reverse":
        handler, target = forwarder.reverse_handler("inventory"), b"/stock"
    else:
        handler, target = forwarder.forward_handler(), b"http://inventory.internal/stock"
    listener = Listener("bench", config.listen, handler, config.limits, metrics)
    route = holder.current.routes["inventory"]
    assert route.origin is not None
    # One warm keep-alive connection, put into the pool as a finished exchange would.
    upstream_conn = UpstreamConnection(pool, route.origin)
    upstream_transport = MemoryTransport()
    upstream_conn.connection_made(upstream_transport)
    upstream_conn.exchanges = 1
    pool._all.add(upstream_conn)
    pool._idle[route.origin] = collections.deque([upstream_conn])
    client = ClientConnection(listener, handler, config.limits)
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    request = REQUEST % target
    for _ in range(requests):
        client.data_received(request)
        upstream_conn.data_received(RESPONSE)
        upstream_transport.written.clear()
        client_transport.written.clear()
    # The loop must have gone the whole way: a request upstream with the token, and
    # the response back to the client.
    client.data_received(request)
    assert b"Authorization: Bearer " + token.encode() in upstream_transport.written[-1]
    upstream_conn.data_received(RESPONSE)
    assert client_transport.written[-1].startswith(b"HTTP/1.1 200 OK\r\n")
    pool.close()


async def drive(mode: str, requests: int) -> None:
    """Relay `requests` requests through the fast path of a `mode` port."""
    relay(bench_config(), FixedToken(), mode, requests, TOKEN)


def count(mode: str, requests: int) -> int:
    """Instructions of a whole `python -m bench.instructions --drive` run."""
    result = subprocess.run(
        [
            *("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
            *(sys.executable, "-m", "bench.instructions", "--drive", mode, str(requests)),
        ],
        capture_output=True,
        text=True,
        check=True,
        # A fixed string-hash seed: dictionary probe sequences (and so the count) repeat.
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    collected = re.search(r"Collected : (\d+)", result.stderr)
    assert collected, result.stderr[-2000:]
    return int(collected.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--mode", choices=["reverse", "forward"], action="append")
    parser.add_argument("--drive", nargs=2, metavar=("MODE", "REQUESTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drive:
        # On uvloop, as `token-proxy run` serves: the clock and futures are uvloop's.
        uvloop.run(drive(args.drive[0], int(args.drive[1])))
        return
    ensure_commands({"valgrind": "valgrind"})
    print(f"data path: {data_path_build()}", flush=True)
    for mode in args.mode or ["reverse", "forward"]:
        per_request = (count(mode, LONG) - count(mode, SHORT)) / (LONG - SHORT)
        print(f"{mode:<8} {per_request:>9,.0f} instructions per request", flush=True)


if __name__ == "__main__":
    main()
