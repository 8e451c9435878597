"""Media fetches over HTTP(S) that cannot be turned against the inside network (SSRF).

The address check happens in the connection layer: `GuardedBackend.connect_tcp` resolves the
host itself, validates every address with `ssrf.check_host` and connects to a validated IP, so
nothing can change between the check and the connect (no DNS-rebinding window). TLS still uses
the original host name for SNI and certificate checks (httpcore passes it to start_tls).
Redirects are followed by hand, at most `max_redirects`, and every hop goes through the same
backend. Bodies are streamed raw (no gzip expansion) under a byte cap.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable, Sequence

import httpcore
import httpx

from services.gateway import ssrf
from shared.errors import InvalidRequestError


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Wraps a network backend; connects only to addresses the SSRF policy accepts."""

    def __init__(
        self,
        allow: Sequence[ssrf.IPNetwork] = (),
        inner: httpcore.AsyncNetworkBackend | None = None,
        resolve_timeout: float = 10.0,
    ) -> None:
        self.allow = list(allow)
        self.inner = inner or httpcore.AnyIOBackend()
        self.resolve_timeout = resolve_timeout

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        check = functools.partial(ssrf.check_host, host, port, allow=self.allow)
        try:  # getaddrinfo blocks: run it off the event loop, bounded
            addresses = await asyncio.wait_for(asyncio.to_thread(check), self.resolve_timeout)
        except asyncio.TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        last: Exception | None = None
        for ip in addresses:  # every one was validated; connect by IP, never by name
            try:
                return await self.inner.connect_tcp(
                    str(ip),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ssrf.BlockedAddressError(path, "unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool rebuilt on a GuardedBackend."""

    def __init__(self, backend: GuardedBackend) -> None:
        super().__init__(trust_env=False, retries=0)
        # httpx exposes no network_backend argument; fail loudly if its internals move.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise RuntimeError("unexpected httpx transport internals: cannot guard fetches")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=backend,
        )


class MediaFetcher:
    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        timeout: float = 10.0,
        max_redirects: int = 5,
        backend: GuardedBackend | None = None,
    ) -> None:
        self.backend = backend or GuardedBackend(
            ssrf.parse_allow_list(allow), resolve_timeout=timeout
        )
        self.timeout = timeout
        self.max_redirects = max_redirects
        self._client = httpx.AsyncClient(
            transport=GuardedTransport(self.backend),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,  # each hop is checked below, then by the backend
            trust_env=False,  # a proxy from the environment would bypass the address check
            headers={"User-Agent": "prism-gateway", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, max_bytes: int, *, param: str | None = None) -> bytes:
        """GET url and return its body; InvalidRequestError (400) for anything refused."""
        try:
            return await asyncio.wait_for(self._fetch(url, max_bytes, param), self.timeout * 3)
        except ssrf.BlockedAddressError as exc:
            raise InvalidRequestError(str(exc), param=param) from exc
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            raise InvalidRequestError(f"fetching {url} timed out", param=param) from exc
        except httpx.InvalidURL as exc:
            raise InvalidRequestError(f"invalid media URL: {exc}", param=param) from exc
        except httpx.HTTPError as exc:
            raise InvalidRequestError(f"fetching {url} failed: {exc}", param=param) from exc

    async def _fetch(self, url: str, max_bytes: int, param: str | None) -> bytes:
        for _ in range(self.max_redirects + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https"):
                raise InvalidRequestError(f"unsupported URL scheme in {url!r}", param=param)
            async with self._client.stream("GET", target) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise InvalidRequestError(
                            f"redirect without Location from {url}", param=param
                        )
                    url = str(target.join(location))
                    continue
                if resp.status_code != 200:
                    raise InvalidRequestError(
                        f"fetching {url} returned HTTP {resp.status_code}", param=param
                    )
                return await _read_capped(resp, max_bytes, url, param)
        raise InvalidRequestError(
            f"too many redirects (>{self.max_redirects}) for {url}", param=param
        )


async def _read_capped(resp: httpx.Response, max_bytes: int, url: str, param: str | None) -> bytes:
    too_big = f"media at {url} exceeds the {max_bytes}-byte limit"
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequestError(too_big, param=param)
    buf = bytearray()
    async for chunk in resp.aiter_raw():
        buf += chunk
        if len(buf) > max_bytes:
            raise InvalidRequestError(too_big, param=param)
    return bytes(buf)
