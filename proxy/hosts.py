"""What a host is, for the rules that decide where a token may travel.

One place answers "does this traffic stay on the machine?": the config loader (a
plain-http `url` or token endpoint), the discovery client and the request planner all
ask `is_loopback_host`. Only the name `localhost` and IP literals in 127.0.0.0/8 or
::1 qualify: a DNS name such as `127.evil.example` resolves wherever its owner says.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_loopback_host"]


def is_loopback_host(host: str) -> bool:
    """`localhost`, an address in 127.0.0.0/8, or ::1 (brackets allowed)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
