"""Which addresses media fetches may reach (SSRF policy), as pure functions on addresses.

Only globally routable unicast addresses pass. IPv6 forms that embed an IPv4 address
(IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64) are judged by the IPv4 address inside, and
numeric host spellings that the C resolver accepts (2130706433, 0x7f000001, 017700000001, 127.1)
are decoded the same way the resolver would, so they cannot smuggle in a loopback address.
`fetch.GuardedBackend` applies this at connect time, on the very addresses it connects to.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class BlockedAddressError(Exception):
    """A fetch was refused by the address policy (never retried, never connected)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"refusing to fetch from {host!r}: {reason}")
        self.host = host
        self.reason = reason


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    elif int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public_address(ip: IPAddress | str) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the socket really talks IPv4 to this address
            return is_public_address(ip.ipv4_mapped)
        if any(not is_public_address(v4) for v4 in _embedded_ipv4(ip)):
            return False
        if ip.is_site_local:
            return False
    elif ip in _CGNAT:
        return False
    bad = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_multicast,
        ip.is_reserved,
        ip.is_unspecified,
    )
    return ip.is_global and not any(bad)


def parse_numeric_host(host: str) -> IPAddress | None:
    """The address a numeric host denotes (any spelling the resolver accepts), else None."""
    bare = host.strip().strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    try:  # inet_aton: the classic decimal / hex / octal / short forms
        return ipaddress.IPv4Address(socket.inet_aton(bare))
    except (OSError, ValueError):
        return None


def resolve(host: str, port: int = 0) -> list[IPAddress]:
    """Every address the system resolver gives for host (tests replace this function)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


def parse_allow_list(entries: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip()]


def _allowed(ip: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    return any(ip.version == net.version and ip in net for net in allow)


def check_addresses(
    host: str, addresses: Iterable[IPAddress], allow: Sequence[IPNetwork] = ()
) -> None:
    for ip in addresses:
        if not (_allowed(ip, allow) or is_public_address(ip)):
            raise BlockedAddressError(host, f"address {ip} is not a public address")


def check_host(host: str, port: int = 0, *, allow: Sequence[IPNetwork] = ()) -> list[IPAddress]:
    """Resolve host and return its addresses, or raise BlockedAddressError when any is refused.

    Any refused address refuses the whole host: a name with one private record could otherwise
    be used to reach the inside, whichever record a later connect picks.
    """
    numeric = parse_numeric_host(host)
    if numeric is not None:
        addresses = [numeric]
    else:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            raise BlockedAddressError(host, f"cannot resolve ({exc})") from exc
    if not addresses:
        raise BlockedAddressError(host, "resolves to no address")
    check_addresses(host, addresses, allow)
    return addresses
