"""The SSRF address policy (pure, no network) and the guarded fetcher against a loopback canary.

No test here sends a packet to a non-loopback address: refused hosts are refused before any
connect, name resolution is patched, and the only real fetches go to the canary on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import ipaddress

import httpcore
import pytest

from services.gateway import ssrf
from services.gateway.fetch import GuardedBackend, MediaFetcher
from services.gateway.testing import CanaryServer
from shared.errors import InvalidRequestError

PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",  # CGNAT
    "0.0.0.0",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "198.18.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fec0::1",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "::127.0.0.1",  # IPv4-compatible
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo wrapping 10.0.0.1
]


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_pass(ip):
    assert ssrf.is_public_address(ip)


@pytest.mark.parametrize("ip", NOT_PUBLIC)
def test_non_public_addresses_refused(ip):
    assert not ssrf.is_public_address(ip)
    assert not ssrf.is_public_address(ipaddress.ip_address(ip))


@pytest.mark.parametrize(
    "host, ip",
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("[::1]", "::1"),
        ("[::ffff:169.254.169.254]", "169.254.169.254"),
    ],
)
def test_numeric_host_tricks_decoded_and_refused(host, ip):
    parsed = ssrf.parse_numeric_host(host)
    assert parsed is not None
    mapped = getattr(parsed, "ipv4_mapped", None) or parsed
    assert str(mapped) == ip
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_host(host)


def test_names_are_not_numeric():
    assert ssrf.parse_numeric_host("example.com") is None
    assert ssrf.parse_numeric_host("1.2.3.4.example.com") is None


def test_check_host_uses_every_resolved_address(monkeypatch):
    answers = {
        "public.test": ["93.184.216.34"],
        "mixed.test": ["93.184.216.34", "10.1.2.3"],  # one private record refuses the name
        "empty.test": [],
    }
    monkeypatch.setattr(
        ssrf, "resolve", lambda host, port=0: [ipaddress.ip_address(a) for a in answers[host]]
    )
    assert [str(a) for a in ssrf.check_host("public.test", 443)] == ["93.184.216.34"]
    with pytest.raises(ssrf.BlockedAddressError, match="10.1.2.3"):
        ssrf.check_host("mixed.test")
    with pytest.raises(ssrf.BlockedAddressError, match="no address"):
        ssrf.check_host("empty.test")


def test_unresolvable_and_localhost_refused(monkeypatch):
    def fail(host, port=0):
        raise OSError("Name or service not known")

    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_host("localhost")  # /etc/hosts only: loopback
    monkeypatch.setattr(ssrf, "resolve", fail)
    with pytest.raises(ssrf.BlockedAddressError, match="cannot resolve"):
        ssrf.check_host("nowhere.invalid")


def test_allow_list_is_explicit():
    allow = ssrf.parse_allow_list(["127.0.0.1"])
    assert ssrf.check_host("127.0.0.1", allow=allow)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_host("127.0.0.2", allow=allow)
    with pytest.raises(ssrf.BlockedAddressError):
        ssrf.check_host("::ffff:127.0.0.1", allow=allow)


class RecordingBackend(httpcore.AsyncNetworkBackend):
    """The real backend, recording the host each connect actually used."""

    def __init__(self) -> None:
        self.real = httpcore.AnyIOBackend()
        self.hosts: list[str] = []

    async def connect_tcp(self, host, port, **kwargs):
        self.hosts.append(host)
        assert ipaddress.ip_address(host).is_loopback, "test tried to leave the machine"
        return await self.real.connect_tcp(host, port, **kwargs)

    async def sleep(self, seconds):  # pragma: no cover
        await self.real.sleep(seconds)


@pytest.fixture(scope="module")
def canary():
    server = CanaryServer({"cat.png": b"\x89PNG fake", "big.bin": b"x" * 5000})
    yield server
    server.stop()


def fetch(canary_url: str, max_bytes: int = 1000, allow=("127.0.0.1/32",), patch=None):
    async def run():
        spy = RecordingBackend()
        fetcher = MediaFetcher(
            timeout=5, backend=GuardedBackend(ssrf.parse_allow_list(allow), inner=spy)
        )
        try:
            return await fetcher.fetch(canary_url, max_bytes), spy.hosts
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def test_canary_fetch_allowed_by_allow_list(canary):
    body, hosts = fetch(canary.url("cat.png"))
    assert body == b"\x89PNG fake" and hosts == ["127.0.0.1"]


def test_canary_refused_without_allow_list(canary):
    with pytest.raises(InvalidRequestError, match="refusing"):
        fetch(canary.url("cat.png"), allow=())


def test_redirect_hops_are_checked(canary):
    body, _ = fetch(canary.url("redirect?to=" + canary.url("cat.png")))
    assert body == b"\x89PNG fake"
    target = f"http://127.0.0.2:{canary.port}/cat.png"
    with pytest.raises(InvalidRequestError, match="127.0.0.2"):
        fetch(canary.url("redirect?to=" + target))
    assert any(h.startswith("/redirect") for h in canary.hits)


def test_redirect_limit(canary):
    url = canary.url("cat.png")
    for _ in range(6):
        url = canary.url("redirect?to=" + url)
    with pytest.raises(InvalidRequestError, match="too many redirects"):
        fetch(url)


def test_size_cap_and_status(canary):
    with pytest.raises(InvalidRequestError, match="limit"):
        fetch(canary.url("big.bin"), max_bytes=1000)
    with pytest.raises(InvalidRequestError, match="HTTP 404"):
        fetch(canary.url("missing"))


def test_connects_to_the_validated_ip_not_the_name(canary, monkeypatch):
    """Resolution happens once, inside connect: the socket goes to the checked address."""
    monkeypatch.setattr(ssrf, "resolve", lambda host, port=0: [ipaddress.ip_address("127.0.0.1")])
    body, hosts = fetch(f"http://canary.test:{canary.port}/cat.png")
    assert body == b"\x89PNG fake" and hosts == ["127.0.0.1"]
    monkeypatch.setattr(ssrf, "resolve", lambda host, port=0: [ipaddress.ip_address("10.0.0.7")])
    with pytest.raises(InvalidRequestError, match="10.0.0.7"):
        fetch(f"http://canary.test:{canary.port}/cat.png")
