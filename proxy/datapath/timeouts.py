"""The data path's fixed times and sizes: the ones no configuration key sets.

The configurable limits (`limits.*`, an upstream's `connect_timeout` and `timeout`) are
in `proxy.config`; what is left is fixed here, by name, so that no module hides a
number of its own. Times are seconds of the event loop's clock.
"""

from __future__ import annotations

from typing import Final

# Request traffic to a host no upstream matches (passthrough): the connect and silence
# timeouts an upstream gets by default (`connect_timeout`, `timeout`).
PASSTHROUGH_CONNECT_TIMEOUT: Final = 5.0
PASSTHROUGH_TIMEOUT: Final = 60.0
# Opening a CONNECT tunnel to a host no upstream matches.
TUNNEL_CONNECT_TIMEOUT: Final = 10.0

# After a 401 that came before the request body was sent: how long a small body may
# still take to go out whole, so that the request can be replayed with a new token.
REPLAY_BODY_WAIT: Final = 1.0

# How often the listener's sweeper checks header and idle deadlines of client
# connections, and how often draining looks again for connections that turned idle.
CLIENT_SWEEP_INTERVAL: Final = 1.0
DRAIN_POLL_INTERVAL: Final = 0.1

# How often the upstream pool's sweeper checks for silent upstreams and stale idle
# connections, and how long an idle upstream connection is kept.
UPSTREAM_SWEEP_INTERVAL: Final = 0.25
UPSTREAM_IDLE_TIMEOUT: Final = 30.0
# Idle keep-alive connections kept per origin (64 made a third of the requests
# reconnect at 128 concurrent clients).
MAX_IDLE_PER_ORIGIN: Final = 1024

# HTTP/2 to upstreams: how long a TLS origin that did not select h2 in ALPN is taken to
# speak HTTP/1.1 only before it is asked again, and how long closing the connections
# waits for GOAWAY to go out before dropping them.
HTTP2_ALPN_RECHECK: Final = 300.0
UPSTREAM_CLOSE_WAIT: Final = 1.0
