"""The benchmark suite: token-proxy against an nginx baseline, on loopback.

`python -m bench` (or `make bench`) installs what it needs, starts an origin, the
nginx baseline, a token endpoint and token-proxy as real processes pinned to their
own cores, runs the loads interleaved and prints a table of medians with the ratios
to nginx. See docs/performance.md for the method and the measured numbers.
"""
