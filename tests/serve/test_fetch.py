"""Image URL fetching (`--allow-image-urls`): public addresses only, checked after resolution, pinned for the
connection, on every redirect; size, time and hop caps. Loopback only: the names resolve through a resolver
the test controls, to HTTP servers on 127.0.0.1, 127.0.0.2 and 127.0.0.3 (all loopback on Linux)."""

import http.server
import ipaddress
import socket
import ssl
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from mgllava.inference import GenerationSettings
from mgllava.serve import ServerSettings, create_app
from mgllava.serve.background import serve_in_thread
from mgllava.serve.fetch import AddressPolicy, non_public, reason

from ..serving import ask, data_url, png_bytes, scene, tiny_engine

CAT = png_bytes(scene(5))


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),  # AWS, GCP, Azure and Oracle metadata
        ("100.100.100.200", "not publicly routable"),  # Alibaba metadata, carrier-grade NAT range
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),  # AWS metadata over IPv6
        ("::ffff:127.0.0.1", "loopback"),
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_only_public_unicast_addresses_pass(address, reason):
    found = non_public(ipaddress.ip_address(address))
    assert (found is None) if reason is None else (reason in found), found


def test_the_allow_list_takes_hostnames_and_networks():
    policy = AddressPolicy(("images.internal", "10.1.2.0/24", "fd12::/16"))
    assert policy.refusal("images.internal", "10.9.9.9") is None  # a trusted name, wherever it points
    assert policy.refusal("other.internal", "10.1.2.77") is None and policy.refusal("x", "fd12::5") is None
    assert "private" in policy.refusal("other.internal", "10.1.3.1")
    assert policy.refusal("public.example", "8.8.4.4") is None
    for bad in ("", "10.0.0.0/33", "fe80::zz"):
        with pytest.raises(ValueError, match="image-url-allow"):
            AddressPolicy((bad,))


class ScriptedResolver:
    """Names -> a script of answers (one per lookup, the last repeated); IP literals answer themselves."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = {name: list(answers) for name, answers in table.items()}
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        if host not in self.table:
            raise socket.gaierror(f"{host}: unknown to this test")
        script = self.table[host]
        return script.pop(0) if len(script) > 1 else script[0]


class Origin(http.server.BaseHTTPRequestHandler):
    """/cat.png, /to?url=X (302), /loop, /big (declared length), /endless (undeclared), /slow; logs requests."""

    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.server.seen.append((self.path, self.headers.get("Host")))
        path, query = urlparse(self.path).path, parse_qs(urlparse(self.path).query)
        if path == "/cat.png":
            self._send(200, CAT, {"Content-Length": str(len(CAT))})
        elif path == "/to":
            self._send(302, b"", {"Location": query["url"][0]})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif path == "/big":
            self._send(200, b"\0" * 70_000, {"Content-Length": "70000"})
        elif path == "/endless":
            self._send(200, b"\0" * 70_000, {})
        elif path == "/slow":
            self.send_response(200)
            self.end_headers()
            time.sleep(3)
        else:
            self._send(404, b"", {})

    def _send(self, status, body, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def origin(address: str, port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((address, port), Origin)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def origins():
    """trusted (127.0.0.2, allow-listed by network), secret (127.0.0.1: must never be reached) and named
    (127.0.0.3, allow-listed by its name), all on one port so that a rebound name reaches the same port."""
    trusted = origin("127.0.0.2", 0)
    port = trusted.server_address[1]
    servers = {"trusted": trusted, "secret": origin("127.0.0.1", port), "named": origin("127.0.0.3", port)}
    yield port, servers
    for server in servers.values():
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def resolver():
    return ScriptedResolver(
        {
            "trusted.test": [["127.0.0.2"]],
            "named.test": [["127.0.0.3"]],
            "metadata.test": [["169.254.169.254"]],
            "split.test": [["127.0.0.2", "10.0.0.1"]],
            "rebind-once.test": [["127.0.0.2"], ["127.0.0.1"]],
            "rebind-hop.test": [["127.0.0.2"], ["127.0.0.1"]],
        }
    )


@pytest.fixture(scope="module")
def base(engine, resolver, origins):
    settings = ServerSettings(model_name="tiny", allow_image_urls=True, image_url_allow=("127.0.0.2/32", "named.test"),
                              image_url_timeout_s=1.0, image_url_max_bytes=50_000)  # fmt: skip
    with serve_in_thread(create_app(engine, settings, resolver=resolver)) as url:
        yield url


def fetch(base: str, url: str) -> httpx.Response:
    body = {"model": "tiny", "messages": ask("What?", url), "max_tokens": 3}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


def test_public_or_allowed_images_are_fetched_with_their_names(base, engine, origins):
    port, servers = origins
    expected = engine.chat(
        ask("What?", data_url(scene(5))), settings=GenerationSettings(max_new_tokens=3)
    ).text
    for url in (f"http://trusted.test:{port}/cat.png", f"http://named.test:{port}/cat.png",
                f"http://127.0.0.2:{port}/to?url=/cat.png"):  # fmt: skip
        reply = fetch(base, url)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == expected
    assert ("/cat.png", f"trusted.test:{port}") in servers["trusted"].seen  # the Host header keeps the name
    assert ("/cat.png", f"named.test:{port}") in servers["named"].seen
    assert servers["secret"].seen == []


def test_a_name_is_resolved_once_per_hop_and_connected_to_as_checked(base, resolver, origins):
    """DNS rebinding: the name answers an allowed address, then loopback. The connection goes to the
    address that was checked; a redirect's new lookup is checked again and refused."""
    port, servers = origins
    reply = fetch(base, f"http://rebind-once.test:{port}/cat.png")
    assert reply.status_code == 200, reply.text
    assert resolver.lookups.count("rebind-once.test") == 1
    hop = fetch(base, f"http://rebind-hop.test:{port}/to?url=http://rebind-hop.test:{port}/cat.png")
    assert hop.status_code == 400 and hop.json()["error"]["code"] == "image_url_forbidden"
    assert "127.0.0.1, a loopback address" in hop.json()["error"]["message"]
    assert resolver.lookups.count("rebind-hop.test") == 2
    assert servers["secret"].seen == []


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("http://127.0.0.1:{port}/cat.png", "loopback"),
        (
            "http://localhost.:{port}/cat.png",
            "unknown to this test",
        ),  # names only resolve through the resolver
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:127.0.0.1]:{port}/cat.png", "loopback"),
        ("http://split.test:{port}/cat.png", "10.0.0.1, a private address"),  # one bad answer is enough
        ("http://127.0.0.2:{port}/to?url=http://127.0.0.1:{port}/cat.png", "loopback"),
        ("http://127.0.0.2:{port}/to?url=http://metadata.test/latest/meta-data/", "link-local"),
    ],
)
def test_private_loopback_and_metadata_addresses_are_refused(base, origins, path, fragment):
    port, servers = origins
    reply = fetch(base, path.format(port=port))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and error["param"] == "messages[0].content[0].image_url.url"
    if "unknown" not in fragment:
        assert error["code"] == "image_url_forbidden" and "--image-url-allow" in error["message"]
    assert servers["secret"].seen == []


@pytest.mark.parametrize(
    "path, status, code, fragment",
    [
        ("/big", 413, "image_too_large", "--image-url-max-mb"),
        ("/endless", 413, "image_too_large", "--image-url-max-mb"),
        ("/slow", 400, "image_url_timeout", "--image-url-timeout-s"),
        ("/loop", 400, "invalid_image_url", "redirects more than 3 times"),
        ("/to?url=file:///etc/passwd", 400, "invalid_image_url", "not an http(s) URL"),
        (
            "/to?url=data:image/png;base64,iVBORw0KGgo=",
            400,
            "invalid_image_url",
            "cannot fetch",
        ),  # InvalidURL
        ("/missing.png", 400, "invalid_image_url", "answered HTTP 404"),
    ],
)
def test_size_time_and_hop_caps(base, origins, path, status, code, fragment):
    port, _ = origins
    reply = fetch(base, f"http://trusted.test:{port}{path}")
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and fragment in error["message"], error


def test_a_failed_fetch_names_its_cause():
    """httpx wraps TLS and socket errors in errors whose own message can be empty: the cause is what says why."""
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate has expired")
        except ssl.SSLError as err:
            raise httpx.ConnectError("") from err
    except httpx.ConnectError as err:
        why = reason(err)
    assert "CERTIFICATE_VERIFY_FAILED" in why and "expired" in why
    assert reason(httpx.ConnectError("")) == "ConnectError"
