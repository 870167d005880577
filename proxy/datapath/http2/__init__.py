"""HTTP/2: the application-facing server connection, upstream connections, gRPC mapping.

Server side (the application speaks HTTP/2 to the proxy): `front` (what the
application wires, and how connections get there), `server` (one connection), `stream`
(one stream relayed as one request), `guards` (the flood bounds), `grpc` (statuses and
trailers-only answers).
Upstream side: `upstream` and `upstream_connection` (HTTP/2 to the origins).
"""
