"""The service's guards, as plain ASGI middleware (no BentoML import, so they are tested on
their own): an optional API key, a request-body limit, and the check that warns when the
server listens beyond loopback without a key.

    BONMF_API_KEY=...                    the key (wins over the file)
    serving.api_key_file: /etc/bonmf/key the key, read when the service starts

With a key, every path but /readyz and /livez (what orchestrators probe, unauthenticated by
design) needs `Authorization: Bearer <key>`; the comparison is constant-time. Without one,
the service is open — fine on 127.0.0.1, warned about on any other interface.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from pathlib import Path

KEY_ENV = "BONMF_API_KEY"
OPEN_PATHS = frozenset({"/readyz", "/livez"})


def resolve_api_key(api_key_file: str | None, environ=os.environ) -> str | None:
    """The API key: `$BONMF_API_KEY`, else the content of `api_key_file`, else None (no
    authentication). A key that is configured but unusable (empty, unreadable) is an error:
    silently serving without the key the operator asked for would be the unsafe way to fail."""
    if KEY_ENV in environ:
        key = environ[KEY_ENV].strip()
        if not key:
            raise ValueError(f"${KEY_ENV} is set but empty: unset it to serve without a "
                             f"key, or give the key")
        return key
    if not api_key_file:
        return None
    path = Path(api_key_file).expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"serving.api_key_file {path}: cannot read the API key "
                         f"({exc})") from None
    if not key:
        raise ValueError(f"serving.api_key_file {path}: the file is empty")
    return key


class ApiKey:
    """The key the middleware checks. It is resolved when the service starts (`resolve`),
    not at import: `bentoml build` imports the service where the key file does not exist."""

    def __init__(self) -> None:
        self.resolved = False
        self._digest: bytes | None = None

    def resolve(self, api_key_file: str | None, environ=os.environ) -> str | None:
        key = resolve_api_key(api_key_file, environ)
        self._digest = None if key is None else _digest(key.encode("utf-8"))
        self.resolved = True
        return key

    @property
    def required(self) -> bool:
        return self._digest is not None

    def accepts(self, authorization: bytes | None) -> bool:
        """`Authorization: Bearer <key>` (scheme case-insensitive, RFC 7235)? Digests of equal
        length are compared with `hmac.compare_digest`, so neither the key's content nor its
        length shows in the response time."""
        if self._digest is None:
            return True
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        return hmac.compare_digest(_digest(token.strip()), self._digest)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


async def _send_json(send, status: int, message: str, headers=()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyAuth:
    """ASGI middleware: 401 for a request without the key, when a key is configured. It sits
    in front of every route — the APIs, /metrics, /docs.json, the UI — except OPEN_PATHS,
    matched exactly (a path that merely starts like one is not open)."""

    def __init__(self, app, api_key: ApiKey):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self.api_key.resolved:  # the service is not initialised: nothing to serve yet
            return await self._refuse(scope, send, 503, "the service is starting")
        if self.api_key.required and not self.api_key.accepts(_header(scope,
                                                                      b"authorization")):
            return await self._refuse(scope, send, 401, "missing or wrong API key: send "
                                                        "'Authorization: Bearer <key>'")
        return await self.app(scope, receive, send)

    async def _refuse(self, scope, send, status: int, message: str):
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await _send_json(send, status, message, [(b"www-authenticate", b"Bearer")]
                         if status == 401 else [])


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


class BodyTooLarge(Exception):
    """A chunked body passed the limit while being read. The service maps it to 413
    (`error_type`); here it only stops the read."""


class BodyLimit:
    """ASGI middleware: refuse a request body over the limit with 413 before reading it
    (Content-Length), or as soon as a chunked body passes it (`on_overflow` builds the
    exception that the framework turns into the 413)."""

    def __init__(self, app, max_bytes: int, on_overflow=BodyTooLarge):
        self.app, self.max_bytes, self.on_overflow = app, max_bytes, on_overflow

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over "
                                               f"the limit of {self.max_bytes} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise self.on_overflow(f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)


def exposure_warning(listening: list[str], key_required: bool) -> str | None:
    """The warning to print when the server listens on an interface other than loopback
    without an API key (None when it is fine)."""
    exposed = sorted({h for h in listening if not _loopback(h)})
    if key_required or not exposed:
        return None
    return (f"WARNING: serving on {', '.join(exposed)} without an API key: anyone who can "
            f"reach this port can use every endpoint. Set ${KEY_ENV} (or "
            f"serving.api_key_file), or bind 127.0.0.1 (--host 127.0.0.1).")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def listening_addresses(pid: int | None = None) -> list[str]:
    """The IP addresses this process (or `pid`) listens on: the socket BentoML hands each
    worker, whatever `--host` or configuration chose it."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:  # not permitted / gone: nothing to say
        return []
    return [c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN]
