"""Keep-alive HTTP/1.1 requests for the agent, on the standard library's http.client.

The agent needs little of an HTTP library: one connection per origin and thread, basic or
bearer authorization, TLS checked against a CA file, a body of known length streamed
from disk, and timeouts. requests cost the agent about 0.3 s of imports at start-up and
0.9 ms of CPU per call, against about 0.15 ms here (cProfile, 2 cores), CPU that Orthanc
needs on a machine that also runs it. This client reads no proxy settings: the agent
connects straight to Orthanc and the dashboard, which sit on the hospital's own network.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import ssl
import threading
from typing import Iterator
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Size of the blocks a streamed request body is read and sent in.
DEFAULT_BLOCK = 1024 * 1024

# Errors that mean the server closed a reused keep-alive connection before its response.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

_contexts: dict[str | None, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


class RequestFailed(Exception):
    """No response came: the connection could not be made or broke, TLS failed, or the server timed out."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class BodyReadError(Exception):
    """A file body could not be read while it was sent; ERROR is the OSError of the read."""

    def __init__(self, error: OSError):
        super().__init__(str(error))
        self.error = error


class Response:
    """A response: its status and reason, and its body unless it is streamed."""

    def __init__(self, status: int, reason: str, body: bytes, raw: http.client.HTTPResponse | None = None,
                 connection: http.client.HTTPConnection | None = None):
        self.status = status
        self.reason = reason
        self.body = body
        self._raw = raw
        self._connection = connection

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body as text (UTF-8, invalid bytes replaced)."""
        return self.body.decode("utf-8", "replace")

    def json(self):
        """Parse the body as JSON; raise ValueError when it is not JSON."""
        return json.loads(self.body)

    def iter_body(self, block: int = DEFAULT_BLOCK) -> Iterator[bytes]:
        """Yield a streamed body in blocks of at most BLOCK bytes."""
        if self._raw is None:
            if self.body:
                yield self.body
            return
        try:
            while True:
                chunk = self._raw.read(block)
                if not chunk:
                    break
                yield chunk
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise RequestFailed(f"the connection broke while reading the response: {error}",
                                timed_out=isinstance(error, TimeoutError)) from error

    def close(self) -> None:
        """End a streamed response; a connection left in the middle of a body cannot be reused."""
        if self._raw is not None and not self._raw.isclosed():
            self._connection.close()
        self._raw = None

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Return the TLS context that checks servers against CA_FILE (the system's CAs when None), shared.

    The file is read once per process; a deploy that changes the site CA restarts the agent.
    """
    with _contexts_lock:
        context = _contexts.get(ca_file)
        if context is None:
            context = ssl.create_default_context(cafile=ca_file)
            _contexts[ca_file] = context
        return context


def basic_authorization(username: str, password: str) -> str:
    """Return the Authorization header value for HTTP basic authentication."""
    token = base64.b64encode(f"{username}:{password}".encode("utf-8")).decode("ascii")
    return f"Basic {token}"


class HttpClient:
    """Keep-alive connections, one per origin, for one thread at a time.

    A request's VERIFY is True to check a TLS server against the system's CAs, or the path of a CA file.
    """

    def __init__(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S, block: int = DEFAULT_BLOCK):
        self.connect_timeout = connect_timeout
        self.block = block
        self._connections: dict[tuple, http.client.HTTPConnection] = {}

    def close(self) -> None:
        """Close every connection."""
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connection(self, scheme: str, host: str, port: int, verify: bool | str) -> http.client.HTTPConnection:
        key = (scheme, host, port, verify)
        connection = self._connections.get(key)
        if connection is None:
            if scheme == "https":
                context = tls_context(verify if isinstance(verify, str) else None)
                connection = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout,
                                                         context=context, blocksize=self.block)
            else:
                connection = http.client.HTTPConnection(host, port, timeout=self.connect_timeout,
                                                        blocksize=self.block)
            self._connections[key] = connection
        return connection

    def request(self, method: str, url: str, body=None, headers: dict[str, str] | None = None,
                verify: bool | str = True, timeout: float = 60.0, stream: bool = False) -> Response:
        """Send one request and return its response.

        BODY is None, bytes, or a file-like object whose length HEADERS give as
        Content-Length. A request without a file body is sent again once at once when a
        reused connection turns out closed by the server. With STREAM, the body is left
        to Response.iter_body, inside a ``with`` block. Raises RequestFailed; a file
        body's read() raises BodyReadError for its own OSError, and that and its other
        errors pass through unchanged.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RequestFailed(f"{url} is not an http:// or https:// URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        resendable = body is None or isinstance(body, (bytes, bytearray))

        for attempt in (1, 2):
            connection = self._connection(parts.scheme, parts.hostname, port, verify)
            reused = connection.sock is not None
            try:
                if connection.sock is None:
                    connection.timeout = self.connect_timeout
                    connection.connect()
                connection.sock.settimeout(timeout)
                connection.request(method, target, body=body, headers=headers or {})
                raw = connection.getresponse()
                if stream:
                    return Response(raw.status, raw.reason, b"", raw, connection)
                data = raw.read()
                return Response(raw.status, raw.reason, data)
            except _STALE_CONNECTION as error:
                connection.close()
                if attempt == 1 and reused and resendable:
                    log.debug("%s %s on a reused connection failed (%s); sending it again on a new one.",
                              method, url, error)
                    continue
                raise RequestFailed(f"the connection to {parts.netloc} broke: {error}") from error
            except TimeoutError as error:
                connection.close()
                raise RequestFailed(f"{parts.netloc} timed out: no response within {timeout:g} s",
                                    timed_out=True) from error
            except ssl.SSLError as error:
                connection.close()
                raise RequestFailed(f"TLS with {parts.netloc} failed: {error}") from error
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                raise RequestFailed(f"cannot reach {parts.netloc}: {error}") from error
            except BaseException:
                # An error of the body's read(): the connection is in the middle of a request.
                connection.close()
                raise
        raise AssertionError("unreachable")
