"""The data path: where a request goes and how it gets there.

A connection arrives at a `listener` and becomes a `client_connection` (its request
stream's `states` in one table), which parses request heads. `planning` (with
`routing`'s host matching) decides where each request goes and whether it gets a
token; `forward` (and, for the common case, `fast_path`) sends it with the token the
route's `injector` puts in, over an `upstream_connection` from the `upstream_pool`, and
relays the answer back, with `flow_control` on both ends. Both paths carry a request
`context` and ask `decisions` what an answer means; `outcomes` counts every answer and
writes the proxy's own. CONNECT is `tunnel`'s. `runtime` holds what a config reload
swaps as one, `messages` filters and serialises header fields, `timeouts` names the
fixed times.
"""
