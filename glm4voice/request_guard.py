"""Which requests a local server answers: a Host allow-list, and no cross-site requests from browsers.

A web page the user visits can make the browser send requests to servers on the user's machine:
cross-site "simple" requests (a form POST, a ``text/plain`` fetch) need no CORS permission, and with DNS
rebinding the browser sends a page's own requests to 127.0.0.1 under the attacker's host name. Both
servers (token server and web demo) check, before the app sees a request:

- **Host**: the ``Host`` header must name a host the server answers to: ``localhost``, ``127.0.0.1``,
  ``[::1]``, the address it listens on (unless that is every interface), and what ``--allowed-hosts``
  adds (``*``: any host). Otherwise 400. Ports are not compared.
- **cross-site**: a request with an ``Origin`` header (browsers send one on every POST and every
  cross-origin request) must come from the server's own origin or from an allowed host name (``*`` does
  not count here); a state-changing request (any method but GET, HEAD, OPTIONS) or a WebSocket handshake
  marked ``Sec-Fetch-Site: cross-site`` is refused as well. Otherwise 403.

Clients that are not browsers send no ``Origin`` and name the host they connect to, so curl, python
``requests``, the ``openai`` SDK and ``glm4voice.client`` all pass.

    app.add_middleware(RequestGuard, policy=HostPolicy.for_server("localhost", ["demo.example.com"]))
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from glm4voice.defaults import LOOPBACK_HOSTS

logger = logging.getLogger("glm4voice.request_guard")

ANY_HOST = "*"
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
WEBSOCKET_POLICY_VIOLATION = 1008


def host_name(value: str) -> str | None:
    """The host name in a ``Host`` header or a host given on the command line: lower case, no port, no
    brackets around an IPv6 address, no trailing dot. None if it cannot be a host."""
    value = value.strip()
    if not value or any(c in value for c in " /\\@?#"):
        return None
    try:
        ipaddress.ip_address(value)  # a bare IPv6 address has colons but no port
        return value.lower()
    except ValueError:
        pass
    try:
        name = urlsplit("//" + value).hostname
    except ValueError:
        return None
    if not name:
        return None
    return name.rstrip(".") or None


def _host_and_port(value: str, scheme: str) -> tuple[str | None, int | None]:
    try:
        parts = urlsplit("//" + value.strip())
        port = parts.port
    except ValueError:
        return None, None
    name = parts.hostname.rstrip(".") if parts.hostname else None
    return name, port if port is not None else DEFAULT_PORTS.get(scheme)


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]
    """Host names (and addresses) answered to, normalized by :func:`host_name`."""
    any_host: bool = False
    """``*`` was allowed: every Host header is accepted (Origins are still checked)."""

    @classmethod
    def for_server(cls, bind_host: str, allowed_hosts: Iterable[str] = ()) -> HostPolicy:
        """The loopback names, ``bind_host`` (unless it is every interface) and ``allowed_hosts``."""
        names = {name for h in LOOPBACK_HOSTS if (name := host_name(h)) is not None}
        if bind_host.strip() not in WILDCARD_ADDRESSES and (bound := host_name(bind_host)) is not None:
            names.add(bound)
        any_host = False
        for entry in allowed_hosts:
            if entry.strip() == ANY_HOST:
                any_host = True
                continue
            name = host_name(entry)
            if name is None:
                raise ValueError(f"not a host name or address: {entry!r}")
            names.add(name)
        return cls(frozenset(names), any_host)

    def describe(self) -> str:
        shown = sorted(f"[{n}]" if ":" in n else n for n in self.names)
        return ", ".join(shown) + (" and any other host (*)" if self.any_host else "")

    def host_allowed(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: not a browser
            return True
        return self.any_host or host_name(host) in self.names

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """``origin`` is the request's own origin (same host and port as ``Host``) or an allowed name."""
        try:
            parts = urlsplit(origin.strip())
            origin_port = parts.port
        except ValueError:
            return False
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:  # "null", file://, garbage
            return False
        origin_name = parts.hostname.rstrip(".")
        if origin_name in self.names:
            return True
        if host is None:
            return False
        if origin_port is None:
            origin_port = DEFAULT_PORTS[parts.scheme]
        return (origin_name, origin_port) == _host_and_port(host, parts.scheme)

    def refusal(self, kind: str, method: str | None, headers: Headers) -> tuple[int, str] | None:
        """(status, message) if a request of ``kind`` ("http" / "websocket") must be refused, else None."""
        host = headers.get("host")
        if host is not None and not self.host_allowed(host):  # no Host header: not a browser
            name = host_name(host) or host
            return 400, (
                f"this server does not answer to the host {host!r} (it answers to {self.describe()}); "
                f"if {name!r} is a name of this server, start it with --allowed-hosts {name}"
            )
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, host):
            return 403, (
                f"cross-site request refused: a page from {origin} may not use this server (only pages served "
                f"by it, or from {self.describe().replace(' and any other host (*)', '')}); clients that are not "
                "browsers send no Origin header"
            )
        state_changing = kind == "websocket" or (method or "GET").upper() not in SAFE_METHODS
        if state_changing and headers.get("sec-fetch-site", "").lower() == "cross-site":
            return 403, "cross-site request refused (Sec-Fetch-Site: cross-site)"
        return None


def wildcard_notice(bind_host: str, policy: HostPolicy) -> str | None:
    """What to tell the user who binds every interface without saying which names clients use."""
    if bind_host.strip() not in WILDCARD_ADDRESSES or policy.names - {host_name(h) for h in LOOPBACK_HOSTS}:
        return None
    return (
        f"listening on every interface ({bind_host!r}) but answering only to {policy.describe()}: other machines "
        "must be allowed by name or address with --allowed-hosts (better: a reverse proxy with TLS and "
        "authentication, see docs/API.md)"
    )


def plain_text(status: int, text: str) -> Response:
    return PlainTextResponse(text + "\n", status_code=status)


class RequestGuard:
    """ASGI middleware applying a :class:`HostPolicy` to HTTP requests and WebSocket handshakes;
    ``respond(status, message)`` builds the refusal (plain text unless given)."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, respond: Callable[[int, str], Response] = plain_text):
        self.app = app
        self.policy = policy
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.policy.refusal(scope["type"], scope.get("method"), Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, text = refusal
        client = scope.get("client")
        logger.warning("refused %s %s from %s: %s", scope.get("method", "WEBSOCKET"), scope.get("path"),
                       f"{client[0]}:{client[1]}" if client else "?", text)  # fmt: skip
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WEBSOCKET_POLICY_VIOLATION, "reason": text[:120]})
            return
        await self.respond(status, text)(scope, receive, send)
