"""The data path: where a request goes and how it gets there.

A connection arrives at a `listener` and becomes a `client_connection`, which parses
request heads. `planning` (with `routing`'s host matching) decides where each request
goes and whether it gets a token; `forward` (and, for the common case, `fast_path`)
adds the token and relays the request over an `upstream_pool` connection and the
answer back, with `flow_control` on both ends. CONNECT is `tunnel`'s. `runtime` holds
what a config reload swaps as one. `messages` filters and serialises header fields.
"""
