"""Fetching image URLs for the server without letting clients reach hosts only the server can see.

Off unless the operator passes `--allow-image-urls`. When on, every hop of a fetch (the URL and each
redirect, at most `max_redirects`) goes through the same steps:

    http(s) URL -> resolve the host once (`resolver`) -> every address must be public (or allow-listed)
        -> connect to that address itself (the URL's host is replaced by it; `Host` and TLS SNI keep the
           name, so certificates are still checked against it) -> 200 -> read at most `max_bytes`

Resolving once and connecting to the checked address closes the gap between checking a name and
connecting to it (DNS rebinding: a name that answers a public address to the check and a private one
to the connect). Refused: loopback, private (RFC 1918, IPv6 ULA), link-local (cloud metadata services
live at 169.254.169.254), carrier-grade NAT (100.64/10, Alibaba's metadata), multicast, unspecified and
reserved ranges, and IPv4 addresses embedded in IPv6 (mapped, 6to4, Teredo, NAT64). A name that resolves
to any refused address is refused. `allow` lists hostnames or networks the operator trusts anyway
(`--image-url-allow`). The whole fetch, redirects included, must finish within `timeout_s`; proxies from
the environment are not used (a proxy would connect to the name itself, unchecked).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from .errors import ApiError

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> the addresses to connect to, in order (tests pass their own)."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    if ip.version == 4:
        return []
    found = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if ip in NAT64:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [v4 for v4 in found if v4 is not None]


def non_public(ip: IPAddress) -> str | None:
    """Why `ip` must not be fetched from (None: a public unicast address)."""
    for inner in _embedded_ipv4(ip):
        reason = non_public(inner)
        if reason:
            return f"{reason} (embedded in {ip})"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "an address that is not publicly routable"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses pass; `allow` entries (hostnames, or IP networks such as 10.1.2.0/24) pass too."""

    allow: tuple[str, ...] = ()
    _names: frozenset[str] = field(init=False, repr=False)
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names, networks = set(), []
        for entry in self.allow:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                raise ValueError("--image-url-allow: empty entry")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if "/" in entry or ":" in entry:
                    raise ValueError(
                        f"--image-url-allow: {entry!r} is neither a hostname nor an IP network"
                    ) from None
                names.add(entry)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_networks", tuple(networks))

    def refusal(self, host: str, address: str) -> str | None:
        """Why `address` (which `host` resolved to) is refused, or None."""
        if host.lower().rstrip(".") in self._names:
            return None
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if any(ip in net for net in self._networks):
            return None
        return non_public(ip)


class ImageFetcher:
    """GET image URLs under `policy`, pinned to the checked addresses, within size, time and hop limits."""

    def __init__(
        self,
        policy: AddressPolicy,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self.resolver = resolver

    async def fetch(self, url: str, param: str) -> bytes:
        try:
            return await asyncio.wait_for(self._follow(url, param), self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(400, f"{param}: fetching {url} did not finish within {self.timeout_s:g} s "
                           "(--image-url-timeout-s)", "image_url_timeout", param) from None  # fmt: skip
        except (
            httpx.HTTPError,
            httpx.InvalidURL,
        ) as err:  # an InvalidURL (a redirect to data:) is no HTTPError
            raise ApiError(400, f"{param}: cannot fetch {url}: {reason(err)}", "invalid_image_url",
                           param) from err  # fmt: skip

    async def _follow(self, url: str, param: str) -> bytes:
        async with httpx.AsyncClient(trust_env=False, timeout=self.timeout_s) as client:
            target = _parse(url, param)
            for _ in range(self.max_redirects + 1):
                response = await self._pinned_get(client, target, param)
                try:
                    if response.is_redirect and "location" in response.headers:
                        target = _parse(str(target.join(response.headers["location"])), param)
                        continue
                    if response.status_code != 200:
                        raise ApiError(400, f"{param}: {target} answered HTTP {response.status_code}",
                                       "invalid_image_url", param)  # fmt: skip
                    return await self._read(response, target, param)
                finally:
                    await response.aclose()
        raise ApiError(400, f"{param}: {url} redirects more than {self.max_redirects} times",
                       "invalid_image_url", param)  # fmt: skip

    async def _pinned_get(self, client: httpx.AsyncClient, target: httpx.URL, param: str) -> httpx.Response:
        host = target.raw_host.decode("ascii")
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            addresses = await self.resolver(host, port)
        except OSError as err:
            raise ApiError(400, f"{param}: cannot resolve {host}: {err}", "invalid_image_url", param) from err
        if not addresses:
            raise ApiError(400, f"{param}: {host} has no address", "invalid_image_url", param)
        for address in addresses:
            reason = self.policy.refusal(host, address)
            if reason:
                raise ApiError(400, f"{param}: {target} resolves to {address}, {reason}; this server only "
                               "fetches from public addresses (the operator can allow a host with "
                               "--image-url-allow)", "image_url_forbidden", param)  # fmt: skip
        failure: httpx.HTTPError | None = None
        for address in addresses:  # connect to a checked address, never to the name again
            request = client.build_request(
                "GET",
                target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii")},
                extensions={"sni_hostname": host},
            )
            try:
                return await client.send(request, stream=True)
            except httpx.ConnectError as err:
                failure = err
        assert failure is not None
        raise failure

    async def _read(self, response: httpx.Response, target: httpx.URL, param: str) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _too_large(target, declared, self.max_bytes, param)
        data = bytearray()
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > self.max_bytes:
                raise _too_large(target, f"more than {self.max_bytes}", self.max_bytes, param)
        return bytes(data)


def reason(err: BaseException) -> str:
    """The error and what caused it (a TLS certificate failure, a refused connection), as one line."""
    seen, parts, link = set(), [], err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        text = str(link).strip()
        if text and text not in parts:
            parts.append(text)
        link = link.__cause__ or link.__context__
    return "; ".join(parts) or type(err).__name__


def _too_large(target: httpx.URL, size: str, limit: int, param: str) -> ApiError:
    return ApiError(413, f"{param}: {target} is {size} bytes; the limit is {limit} bytes (--image-url-max-mb)",
                    "image_too_large", param)  # fmt: skip


def _parse(url: str, param: str) -> httpx.URL:
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise ApiError(400, f"{param}: not a valid URL ({err})", "invalid_image_url", param) from err
    if target.scheme not in ("http", "https") or not target.host:
        raise ApiError(400, f"{param}: {url} is not an http(s) URL", "invalid_image_url", param)
    return target
