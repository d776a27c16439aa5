"""Fetching GIF bytes (pipeline/sources.py): local files, and http from a server on 127.0.0.1 only."""

import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline import sources
from pipeline.sources import FetchError, FetchPolicy, fetch

GIF = b"GIF89a" + bytes(range(200))
# Small limits so every failure mode shows up within a fraction of a second.
POLICY = FetchPolicy(max_bytes=1000, socket_timeout_s=0.3, deadline_s=1.0, retries=2, backoff_s=0.01)


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, code, body=b"", length=None):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.hits[self.path] += 1
        try:
            if self.path == "/ok.gif":
                self._send(200, GIF)
            elif self.path == "/flaky.gif":  # fails once, then works: a transient error worth a retry
                self._send(503) if self.hits[self.path] == 1 else self._send(200, GIF)
            elif self.path == "/slow.gif":  # answers only after the client's socket timeout
                time.sleep(1.5)
                self._send(200, GIF)
            elif self.path == "/trickle.gif":  # a byte at a time: each read is quick, the download never ends
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    self.wfile.write(b"G")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif self.path == "/declared-huge.gif":
                self._send(200, GIF, length=10**9)
            elif self.path == "/streamed-huge.gif":  # no Content-Length: the cap must hold while reading
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(50):
                    self.wfile.write(bytes(512))
            else:
                self._send(404, b"not here")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as intended
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _fails(source, policy=POLICY) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(source, policy)
    return info.value


def test_http_success(server):
    assert fetch(f"{server}/ok.gif", POLICY) == GIF


def test_http_404_is_final_and_not_retried(server):
    error = _fails(f"{server}/missing.gif")
    assert error.reason == "http 404"
    assert _Handler.hits["/missing.gif"] == 1


def test_http_transient_error_is_retried(server):
    assert fetch(f"{server}/flaky.gif", POLICY) == GIF
    assert _Handler.hits["/flaky.gif"] == 2


def test_http_slow_server_times_out(server):
    assert _fails(f"{server}/slow.gif").reason == "timeout"


def test_http_trickling_server_hits_the_whole_download_deadline(server):
    assert _fails(f"{server}/trickle.gif").reason == "timeout"


@pytest.mark.parametrize("path", ["/declared-huge.gif", "/streamed-huge.gif"])
def test_http_size_cap(server, path):
    assert _fails(f"{server}{path}").reason == "too large"


def test_unreachable_host_is_skipped_after_repeated_failures():
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    policy = FetchPolicy(socket_timeout_s=0.3, retries=0, host_failure_limit=2)
    for i in range(2):
        error = _fails(f"http://127.0.0.1:{port}/{i}.gif", policy)
        assert error.reason == "connection failed" and "skipped" not in error.detail
    error = _fails(f"http://127.0.0.1:{port}/2.gif", policy)
    assert error.reason == "connection failed" and "skipped: 2 failed connections" in error.detail


def test_unknown_host_fails_at_once_without_retries(monkeypatch):
    calls = []

    def no_such_name(host, *args, **kwargs):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    # No real lookup leaves this machine: the resolver's answer is simulated.
    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    error = _fails("http://gifs.example.invalid/a.gif")
    assert error.reason == "host not found"
    assert calls == ["gifs.example.invalid"]


def test_malformed_url():
    assert _fails("http://[::1/a.gif").reason == "bad url"


def test_local_file(tmp_path):
    path = tmp_path / "a.gif"
    path.write_bytes(GIF)
    assert fetch(str(path), POLICY) == GIF


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: str(d / "missing.gif"), "file not found"),
        (lambda d: str(d), "not a file"),
        (lambda d: (d / "big.gif").write_bytes(bytes(2000)) and str(d / "big.gif"), "too large"),
        (lambda d: "nosuchfs://bucket/a.gif", "unsupported source"),
    ],
)
def test_local_failures(tmp_path, make, reason):
    assert _fails(make(tmp_path)).reason == reason


def test_file_names_ending_in_gz_are_not_decompressed(tmp_path):
    path = tmp_path / "odd.gif.gz"
    path.write_bytes(GIF)
    assert sources.fetch(str(path), POLICY) == GIF
