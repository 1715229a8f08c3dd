"""The browser boundary, as Ollama draws it: which `Host` and `Origin` values may reach the server at all.

A server on 127.0.0.1 without a key is reachable by every web page the person running it opens:
- a DNS-rebinding page (`rebind.example` resolving to 127.0.0.1) is same-origin with the server and reads every
  answer; its requests carry `Host: rebind.example:PORT`. So, when bound to a loopback address (or anywhere
  without an API key), only Host values that are IP literals, `localhost`, `*.localhost` or this machine's host
  name are served (`--allowed-hosts` adds names). A non-loopback bind with an API key skips the check: the key
  is the boundary there, and a rebinding page does not have it.
- a cross-site "simple" request (`Content-Type: text/plain`, no preflight) would be processed even though CORS
  withholds the answer from the page. So a request whose `Origin` is present and not allowed gets 403 here,
  outside every other middleware: its body is never read and no handler runs. Allowed: the CORS origins
  (`--allowed-origins`; by default localhost pages) and the server's own origin (the chat page, whose Origin
  names the Host it was loaded from). curl and the SDKs send no Origin and are unaffected.
- a cross-site `<img>`, `<script>` or link sends no Origin on a GET, but browsers mark it `Sec-Fetch-Site:
  cross-site` (Fetch Metadata): such a request gets 403 too, except a navigation to one of the pages (a link to
  the chat page). Without the header (curl, SDKs, old browsers) nothing changes.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from functools import lru_cache

from turbofan.server.errors import error_body
from turbofan.server.pages import is_open_path
from turbofan.server.settings import LOCAL_ORIGIN_REGEX, ServerSettings


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_bind(host: str) -> bool:
    """Whether a bind address lets only this machine connect (127.0.0.0/8, ::1, `localhost`)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_check_needed(bind: str | None, api_key: str | None) -> bool:
    """The Host check runs unless the server is reachable from other machines *and* needs a key; an app that
    is not bound to a socket (tests, in-process use: `bind` None) has nothing to rebind."""
    if bind is None:
        return False
    return is_loopback_bind(bind) or not api_key


def host_name(header: str) -> str:
    """The host part of a Host header, lower case: `[::1]:8000` -> `::1`, `a.example.:80` -> `a.example`."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.removesuffix(".")


@lru_cache(maxsize=1)
def machine_names() -> frozenset[str]:
    """This machine's host name (as `hostname` prints it, and its first label), lower case."""
    name = socket.gethostname().lower().removesuffix(".")
    return frozenset(n for n in (name, name.partition(".")[0]) if n)


def _matches(host: str, pattern: str) -> bool:
    """An `--allowed-hosts` entry: an exact name, `*.suffix` (any name under it), or `*` (any host)."""
    pattern = pattern.strip().lower().removesuffix(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def allowed_host(header: str, extra: list[str]) -> bool:
    """Ollama's rule: IP literals, `localhost`, `*.localhost` and this machine's name; plus `extra`."""
    host = host_name(header)
    if not host or host == "localhost" or host.endswith(".localhost") or _is_ip(host):
        return True
    return host in machine_names() or any(_matches(host, p) for p in extra)


def allowed_origin(origin: str, host_header: str, settings: ServerSettings) -> bool:
    """The CORS origins (`--allowed-origins`, default: localhost pages), or the request's own origin (a page
    this server served calling it back: its Origin's authority is the Host it was loaded from)."""
    configured = [o.strip() for o in (settings.allowed_origins or []) if o.strip()]
    if "*" in configured or origin in configured:
        return True
    if not configured and re.fullmatch(LOCAL_ORIGIN_REGEX, origin):
        return True
    scheme, sep, authority = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and bool(host_header) and authority.lower() == host_header.lower()


class BrowserBoundary:
    """Pure ASGI, outermost: refuses a request from a disallowed Host or Origin with 403 in the API's own
    error format, before anything reads its body or sees it."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.check_host = host_check_needed(settings.host, settings.api_key)
        self.extra_hosts = list(settings.allowed_hosts or [])

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(dict(scope.get("headers") or []), scope["path"])
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _forbid(send, scope["path"], *refusal)

    def refusal(self, headers: dict[bytes, bytes], path: str) -> tuple[str, str] | None:
        """(message, code) when this request may not pass, else None."""
        host = headers.get(b"host", b"").decode("latin-1")
        if self.check_host and not allowed_host(host, self.extra_hosts):
            return (f"host {host_name(host)!r} is not allowed (a guard against DNS rebinding): use an IP address or "
                    "localhost, or start the server with --allowed-hosts", "host_not_allowed")  # fmt: skip
        origin = headers.get(b"origin")
        if origin is not None:
            text = origin.decode("latin-1").strip()
            if not allowed_origin(text, host, self.settings):
                return (f"origin {text!r} is not allowed: start the server with --allowed-origins to let that page "
                        "call it", "origin_not_allowed")  # fmt: skip
        elif headers.get(b"sec-fetch-site") == b"cross-site" and not self._page_navigation(headers, path):
            return ("a cross-site request without an Origin (another site's <img>, <script> or link) may not reach "
                    "the API", "cross_site_request")  # fmt: skip
        return None

    @staticmethod
    def _page_navigation(headers: dict[bytes, bytes], path: str) -> bool:
        """A link from elsewhere to the chat page or the dashboard: the pages hold no data and do nothing."""
        return headers.get(b"sec-fetch-mode") == b"navigate" and is_open_path(path)


async def _forbid(send, path: str, message: str, code: str) -> None:
    """403 in the calling API's shape; the connection closes, since the body (if any) is never read."""
    body = json.dumps(error_body(path, 403, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})
