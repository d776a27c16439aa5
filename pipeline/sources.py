"""Fetching a GIF's bytes from a local path, a `gs://` path (contracts/storage.py) or an http(s) URL.

Every failure raises `FetchError` with a short `reason` (counted in dataset_info.json) and a specific `detail`, never
anything else, so the job dead-letters the line and carries on.

http(s) downloads are bounded three ways: a per-socket-operation timeout, a wall-clock deadline for the whole
download (a server that trickles one byte at a time defeats the socket timeout alone) and a size cap. Transient
failures (timeouts, refused connections, 5xx, 429) are retried with exponential backoff; permanent ones (4xx, an
unknown host) are not. A host that failed to connect `host_failure_limit` times in a row is skipped for
`host_cooldown_s`: a manifest of 100,000 URLs on a dead host then costs a few failed connections, not 100,000
timeouts. This matters most for name resolution, which no socket timeout bounds (getaddrinfo cannot be interrupted;
the system resolver's own timeouts apply): an unresolvable host costs a few lookups per worker process, not one per
line.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from contracts import storage

_CHUNK = 1 << 16
_USER_AGENT = "yagg-preprocess/0.1"


class FetchError(Exception):
    """The source's bytes could not be had. `reason` is a short category, `detail` the specific cause.

    `transient` marks a failure worth retrying; `unreachable` one that says the host could not be reached at all
    (it counts towards skipping the host).
    """

    def __init__(self, reason: str, detail: str = "", transient: bool = False, unreachable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail or reason
        self.transient = transient
        self.unreachable = unreachable


@dataclass(frozen=True)
class FetchPolicy:
    """Limits on one fetch. The defaults suit TGIF-sized GIFs (most under 5 MB) on a datacentre network."""

    max_bytes: int = 32 << 20
    socket_timeout_s: float = 10.0  # per connect / per read
    deadline_s: float = 60.0  # for the whole download, retries included
    retries: int = 2  # extra attempts after a transient failure
    backoff_s: float = 0.5  # first retry's delay; doubles after each retry
    host_failure_limit: int = 3  # consecutive connection failures before a host is skipped
    host_cooldown_s: float = 60.0


class _HostHealth:
    """Consecutive connection failures per host (and port), shared by the fetching threads of one worker process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float, FetchError]] = {}

    def check(self, host: str, policy: FetchPolicy) -> None:
        with self._lock:
            count, since, last = self._failures.get(host, (0, 0.0, None))
        if count >= policy.host_failure_limit and time.monotonic() - since < policy.host_cooldown_s:
            raise FetchError(last.reason, f"skipped: {count} failed connections in a row to {host} ({last.detail})")

    def failed(self, host: str, error: FetchError) -> None:
        with self._lock:
            count = self._failures.get(host, (0, 0.0, None))[0]
            self._failures[host] = (count + 1, time.monotonic(), error)

    def succeeded(self, host: str) -> None:
        with self._lock:
            self._failures.pop(host, None)


_HOSTS = _HostHealth()


def fetch(source: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """The bytes of `source` (an http(s) URL, a local path or a gs:// path), at most `policy.max_bytes`."""
    if source.startswith(("http://", "https://")):
        return _fetch_http(source, policy)
    return _fetch_file(source, policy)


def _fetch_file(path: str, policy: FetchPolicy) -> bytes:
    try:
        storage.check(path, "source")
    except storage.PathError as e:  # a scheme yagg does not read (s3://, ftp://, a typo)
        raise FetchError("unsupported source", str(e)) from e
    try:
        with storage.path(path).open("rb") as f:
            data = f.read(policy.max_bytes + 1)
    except FileNotFoundError as e:
        raise FetchError("file not found", str(e)) from e
    except IsADirectoryError as e:
        raise FetchError("not a file", str(e)) from e
    except Exception as e:  # backends wrap their errors in several types (OSError, HTTP errors, ...)
        if not storage.exists(path):
            raise FetchError("file not found", path) from e
        raise FetchError("read failed", f"{type(e).__name__}: {e}") from e
    if len(data) > policy.max_bytes:
        raise FetchError("too large", f"{path} is larger than {policy.max_bytes} bytes")
    return data


def _fetch_http(url: str, policy: FetchPolicy) -> bytes:
    try:
        # host:port, since one machine may serve on one port and refuse on another
        host = urllib.parse.urlsplit(url).netloc
    except ValueError as e:
        raise FetchError("bad url", f"{url}: {e}") from e
    deadline = time.monotonic() + policy.deadline_s
    delay = policy.backoff_s
    for attempt in range(policy.retries + 1):
        _HOSTS.check(host, policy)
        try:
            data = _download(url, policy, deadline)
        except FetchError as e:
            if e.unreachable:
                _HOSTS.failed(host, e)
            if not e.transient or attempt == policy.retries or time.monotonic() + delay >= deadline:
                raise FetchError(e.reason, f"{e.detail} (attempt {attempt + 1})") from e
        else:
            _HOSTS.succeeded(host)
            return data
        time.sleep(delay)
        delay *= 2
    raise AssertionError("unreachable: the last attempt returns or raises")


def _download(url: str, policy: FetchPolicy, deadline: float) -> bytes:
    """One attempt."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=policy.socket_timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError("too large", f"Content-Length {length} exceeds {policy.max_bytes} bytes")
            chunks, size = [], 0
            # read1 returns what has arrived: a plain read(n) would wait for all n bytes, past the deadline.
            while chunk := response.read1(_CHUNK):
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchError("too large", f"more than {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError("timeout", f"download took longer than {policy.deadline_s:g} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as e:
        if e.code == 429 or e.code >= 500:
            raise FetchError(f"http {e.code}", f"{url}: {e.reason}", transient=True) from e
        raise FetchError(f"http {e.code}", f"{url}: {e.reason}") from e
    except urllib.error.URLError as e:
        raise _classify(e.reason, url) from e
    except TimeoutError as e:
        raise FetchError("timeout", f"{url}: no data for {policy.socket_timeout_s:g} s", transient=True) from e
    except ValueError as e:  # a URL urllib cannot even parse
        raise FetchError("bad url", f"{url}: {e}") from e
    except (http.client.HTTPException, OSError) as e:
        raise FetchError("connection failed", f"{url}: {type(e).__name__}: {e}", transient=True) from e


def _classify(reason: object, url: str) -> FetchError:
    """Maps the cause inside a URLError (raised while connecting) to a FetchError."""
    if isinstance(reason, socket.gaierror):
        # EAI_AGAIN: the resolver did not answer, worth another try; any other answer (no such name) is final.
        transient = reason.errno == socket.EAI_AGAIN
        return FetchError("host not found", f"{url}: {reason}", transient=transient, unreachable=True)
    if isinstance(reason, TimeoutError):
        return FetchError("timeout", f"{url}: connecting timed out", transient=True, unreachable=True)
    if isinstance(reason, OSError):
        return FetchError("connection failed", f"{url}: {reason}", transient=True, unreachable=True)
    return FetchError("bad url", f"{url}: {reason}")
