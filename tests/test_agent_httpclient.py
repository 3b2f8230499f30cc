"""Tests of the agent's keep-alive HTTP client: connection reuse, a server that drops idle
connections, timeouts and streamed bodies, against a small HTTP/1.1 server on loopback."""

from __future__ import annotations

import http.server
import io
import threading

import pytest

from dicomfleet.agent.httpclient import BodyReadError, HttpClient, RequestFailed, basic_authorization


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/slow":
            self.server.release.wait(10)
        if self.path == "/large":
            self._reply(200, b"x" * 3_000_000)
            return
        self._reply(200, f"{self.headers.get('Authorization')}".encode())
        if self.server.drop_after_answer:
            # Close without "Connection: close", as a server ending an idle keep-alive connection does.
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.bodies.append(self.rfile.read(length))
        self._reply(200, b"stored")
        if self.server.drop_after_answer:
            self.close_connection = True


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.connections = 0
    httpd.bodies = []
    httpd.drop_after_answer = False
    httpd.release = threading.Event()
    # The test of a failing body leaves the server a short request; its traceback is noise here.
    httpd.handle_error = lambda request, address: None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_requests_share_one_connection(server):
    with HttpClient() as client:
        answers = [client.request("GET", _url(server, "/a")).status for _ in range(3)]

    assert answers == [200, 200, 200]
    assert server.connections == 1


def test_dropped_connection_reopened_for_get(server):
    server.drop_after_answer = True
    with HttpClient() as client:
        first = client.request("GET", _url(server, "/a"))
        second = client.request("GET", _url(server, "/b"))

    assert (first.status, second.status) == (200, 200)
    assert server.connections == 2


def test_dropped_connection_fails_file_body(server):
    server.drop_after_answer = True
    with HttpClient() as client:
        client.request("GET", _url(server, "/a"))
        with pytest.raises(RequestFailed, match="broke"):
            client.request("POST", _url(server, "/upload"), body=io.BytesIO(b"12345"),
                           headers={"Content-Length": "5"})


def test_file_body_sent_with_its_length(server):
    with HttpClient(block=4) as client:
        answer = client.request("POST", _url(server, "/upload"), body=io.BytesIO(b"0123456789"),
                                headers={"Content-Length": "10"})

    assert answer.text == "stored"
    assert server.bodies == [b"0123456789"]


def test_body_read_error_passes_through(server):
    class Failing(io.BytesIO):
        def read(self, amount=-1):
            raise BodyReadError(PermissionError(13, "Permission denied"))

    with HttpClient() as client:
        with pytest.raises(BodyReadError):
            client.request("POST", _url(server, "/upload"), body=Failing(), headers={"Content-Length": "10"})


def test_silent_server_times_out(server):
    with HttpClient() as client:
        with pytest.raises(RequestFailed) as caught:
            client.request("GET", _url(server, "/slow"), timeout=0.5)

    assert caught.value.timed_out is True


def test_closed_port_names_the_address():
    probe = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    port = probe.server_address[1]
    probe.server_close()

    with HttpClient() as client:
        with pytest.raises(RequestFailed, match=f"cannot reach 127.0.0.1:{port}"):
            client.request("GET", f"http://127.0.0.1:{port}/")


def test_streamed_body_read_in_blocks(server):
    with HttpClient() as client:
        with client.request("GET", _url(server, "/large"), stream=True) as answer:
            sizes = [len(chunk) for chunk in answer.iter_body(1_000_000)]

    assert sizes == [1_000_000, 1_000_000, 1_000_000]


def test_abandoned_stream_closes_connection(server):
    with HttpClient() as client:
        with client.request("GET", _url(server, "/large"), stream=True) as answer:
            next(answer.iter_body(1000))
        after = client.request("GET", _url(server, "/a"))

    assert after.status == 200
    assert server.connections == 2


def test_basic_authorization_header(server):
    header = basic_authorization("ct1", "pa:ss")
    with HttpClient() as client:
        answer = client.request("GET", _url(server, "/a"), headers={"Authorization": header})

    assert answer.text == "Basic Y3QxOnBhOnNz"


def test_not_an_http_url_rejected():
    with HttpClient() as client:
        with pytest.raises(RequestFailed, match="is not an http:// or https:// URL"):
            client.request("GET", "ftp://127.0.0.1/")
