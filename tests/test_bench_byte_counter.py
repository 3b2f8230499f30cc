"""Unit tests of bench.byte_counter: request counting in split streams and a proxy on loopback sockets."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

# bench/ is a top-level package of the checkout, not part of the installed dicomfleet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.byte_counter import CountingProxy, HTTPRequestCounter, MongoMessageCounter  # noqa: E402


def test_http_counter_two_gets_in_one_chunk():
    counter = HTTPRequestCounter()
    counter.feed(b"GET /changes?since=5 HTTP/1.1\r\nHost: x\r\n\r\nGET /statistics HTTP/1.1\r\n\r\n")
    assert counter.requests == ["GET /changes?since=5 HTTP/1.1", "GET /statistics HTTP/1.1"]


def test_http_counter_request_split_across_chunks():
    counter = HTTPRequestCounter()
    counter.feed(b"GET /changes HT")
    counter.feed(b"TP/1.1\r\nHost: x\r")
    assert counter.requests == []
    counter.feed(b"\n\r\n")
    assert counter.requests == ["GET /changes HTTP/1.1"]


def test_http_counter_skips_body():
    counter = HTTPRequestCounter()
    body = b"GET /fake HTTP/1.1\r\n\r\n"
    counter.feed(b"POST /instances HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
    counter.feed(body[5:] + b"GET /changes HTTP/1.1\r\n\r\n")
    assert counter.requests == ["POST /instances HTTP/1.1", "GET /changes HTTP/1.1"]


def _mongo_message(opcode: int, payload: bytes) -> bytes:
    length = 16 + len(payload)
    return (length.to_bytes(4, "little") + (1).to_bytes(4, "little") + (0).to_bytes(4, "little")
            + opcode.to_bytes(4, "little") + payload)


def test_mongo_counter_split_messages():
    counter = MongoMessageCounter()
    stream = _mongo_message(2013, b"a" * 40) + _mongo_message(2013, b"b" * 10)
    counter.feed(stream[:30])
    assert counter.requests == []
    counter.feed(stream[30:])
    assert counter.requests == ["opcode 2013", "opcode 2013"]


class _EchoServer:
    """A loopback TCP server that sends back every byte it receives."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data)


def _wait_for_bytes(proxy: CountingProxy, expected: int) -> None:
    deadline = time.monotonic() + 5
    while proxy.traffic().bytes_received < expected and time.monotonic() < deadline:
        time.sleep(0.01)


def test_proxy_counts_both_directions():
    server = _EchoServer()
    proxy = CountingProxy(("127.0.0.1", server.port), HTTPRequestCounter).start()
    request = b"GET /changes HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(request)
            echoed = b""
            while len(echoed) < len(request):
                echoed += client.recv(4096)
            _wait_for_bytes(proxy, len(request))
        traffic = proxy.traffic()
    finally:
        proxy.close()
        server.listener.close()

    assert echoed == request
    assert traffic.bytes_sent == len(request)
    assert traffic.bytes_received == len(request)
    assert traffic.requests == ["GET /changes HTTP/1.1"]


def test_proxy_reset_zeroes_counts():
    server = _EchoServer()
    proxy = CountingProxy(("127.0.0.1", server.port), HTTPRequestCounter).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            client.recv(4096)
            _wait_for_bytes(proxy, 18)
            proxy.reset()
            traffic = proxy.traffic()
    finally:
        proxy.close()
        server.listener.close()

    assert traffic.total_bytes == 0
    assert traffic.requests == []
