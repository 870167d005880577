"""What a host is, for the rules that decide where a token or a request may travel.

One place answers "does this traffic stay on the machine?": the config loader (a
plain-http `url` or token endpoint), the discovery client and the request planner all
ask `is_loopback_host`. Only the name `localhost` and IP literals in 127.0.0.0/8 or
::1 qualify: a DNS name such as `127.evil.example` resolves wherever its owner says.

And one place answers "is this a link-local or cloud-metadata target?"
(`is_link_local_target`): the request planner and the tunnel handler refuse such
targets for requests no upstream matches, by name before connecting and by the
connected peer's address after (a name may resolve to one).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

__all__ = ["LINK_LOCAL_SETTING", "is_link_local_target", "is_loopback_host"]

# The setting that lets passthrough traffic reach such targets; named in refusals.
LINK_LOCAL_SETTING: Final = "allow_link_local_targets"

# Instance metadata services: AWS, GCP, Azure, OpenStack (169.254.169.254, also
# link-local), AWS over IPv6 (fd00:ec2::254), Alibaba Cloud (100.100.100.200), and
# the names GCP resolves to them.
_METADATA_NAMES: Final = frozenset({"metadata.google.internal", "metadata"})
_METADATA_ADDRESSES: Final = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)


def is_loopback_host(host: str) -> bool:
    """`localhost`, an address in 127.0.0.0/8, or ::1 (brackets allowed)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_link_local_target(host: str) -> bool:
    """A link-local address (169.254.0.0/16, fe80::/10; IPv4-mapped too), a cloud
    metadata address, or a metadata service's name. `host` is a normalised host (lower
    case, no trailing dot, IPv6 without brackets) or a peer address (a zone allowed)."""
    if host in _METADATA_NAMES:
        return True
    first = host[:1]
    if not (first.isdigit() or ":" in host):
        return False  # a DNS name: its address is checked once connected
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        try:
            # What the system resolver also reads as an IPv4 address: `2852039166`,
            # `0xa9fea9fe`, `169.254.43518`, octal parts (inet_aton(3)).
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address in _METADATA_ADDRESSES
