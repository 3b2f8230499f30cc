"""A loopback TCP proxy that counts the bytes and requests passing through it.

The sync and the polling baseline talk to Orthanc (HTTP) and MongoDB (wire protocol)
through one proxy each, so the cost of an idle cycle is measured on the wire.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading

log = logging.getLogger(__name__)

BUFFER_SIZE = 65536

_CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)


class HTTPRequestCounter:
    """Counts HTTP/1.1 requests in a client's byte stream, keeping each request line.

    Bodies are skipped by their Content-Length. Chunked request bodies are not
    parsed, because a change-feed poll and a listing send GET requests only.
    """

    def __init__(self):
        self.buffer = b""
        self.body_remaining = 0
        self.requests: list[str] = []

    def feed(self, data: bytes) -> None:
        """Consume DATA, the next bytes the client sent."""
        self.buffer += data
        while True:
            if self.body_remaining:
                skipped = min(self.body_remaining, len(self.buffer))
                self.buffer = self.buffer[skipped:]
                self.body_remaining -= skipped
                if self.body_remaining:
                    return

            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            self.buffer = self.buffer[end + 4:]
            self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
            length = _CONTENT_LENGTH.search(head)
            self.body_remaining = int(length.group(1)) if length else 0


class MongoMessageCounter:
    """Counts MongoDB wire protocol messages: each starts with its total length, 32-bit little endian."""

    def __init__(self):
        self.buffer = b""
        self.requests: list[str] = []

    def feed(self, data: bytes) -> None:
        """Consume DATA, the next bytes the client sent."""
        self.buffer += data
        while len(self.buffer) >= 16:
            length = int.from_bytes(self.buffer[:4], "little")
            if length < 16 or len(self.buffer) < length:
                return
            opcode = int.from_bytes(self.buffer[12:16], "little")
            self.requests.append(f"opcode {opcode}")
            self.buffer = self.buffer[length:]


@dataclasses.dataclass
class Traffic:
    """Bytes in each direction and the requests seen, since the last reset."""

    bytes_sent: int
    bytes_received: int
    requests: list[str]

    @property
    def total_bytes(self) -> int:
        """Bytes in both directions."""
        return self.bytes_sent + self.bytes_received


class CountingProxy:
    """Forwards every connection on a loopback port to UPSTREAM and counts its traffic."""

    def __init__(self, upstream: tuple[str, int], counter_class):
        self.upstream = upstream
        self.counter_class = counter_class
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.counters: list = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name=f"bench-proxy-{self.port}", daemon=True)

    def start(self) -> "CountingProxy":
        """Start accepting connections."""
        self.thread.start()
        log.info("Counting proxy on 127.0.0.1:%d forwards to %s:%d.", self.port, *self.upstream)
        return self

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError as error:
                log.error("The counting proxy cannot reach %s:%d: %s", *self.upstream, error)
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            counter = self.counter_class()
            with self.lock:
                self.counters.append(counter)
            threading.Thread(target=self._pump, args=(client, server, counter, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, counter, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(BUFFER_SIZE)
                if not data:
                    break
                with self.lock:
                    if from_client:
                        self.bytes_sent += len(data)
                        counter.feed(data)
                    else:
                        self.bytes_received += len(data)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # Each socket is the source of exactly one pump, which closes it.
            source.close()

    def traffic(self) -> Traffic:
        """Return the traffic since the last reset."""
        with self.lock:
            requests = [line for counter in self.counters for line in counter.requests]
            return Traffic(self.bytes_sent, self.bytes_received, requests)

    def reset(self) -> None:
        """Zero the byte counts and forget the requests seen so far."""
        with self.lock:
            self.bytes_sent = 0
            self.bytes_received = 0
            for counter in self.counters:
                counter.requests.clear()

    def close(self) -> None:
        """Stop accepting connections; open connections end when their peers close them."""
        self.closing.set()
        try:
            # Shutting the listener down wakes the thread blocked in accept().
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(timeout=5)
