"""`yagg serve`: text-to-GIF over HTTP (serve/app.py) on uvicorn, with a graceful shutdown.

    yagg serve --model models/shapes                 # an exported model, on http://127.0.0.1:8000
    yagg serve --workdir runs/demo --follow --port 8080 --token-file tokens.txt

SIGTERM (what Kubernetes, systemd and load balancers send) drains instead of dropping work: /readyz turns 503 and new
submits get 503, the running batch and every queued job finish (up to --drain-timeout-s), then the process exits 0.
Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn

from serve.settings import ServeSettings, add_flags, from_args

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yagg serve",
        description="Serve a model over HTTP to many users at once: a web page at /, a JSON API under /v1 (OpenAPI "
        "at /docs), /healthz, /readyz and Prometheus /metrics. Concurrent requests are batched on the devices; every "
        "program is compiled before /readyz says ready.",
        allow_abbrev=False,
    )
    add_flags(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`yagg serve ARGS`; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(list(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    settings = from_args(args)
    problems = settings.problems()
    if problems:
        print(f"yagg serve: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    return serve(settings)


def serve(settings: ServeSettings) -> int:
    """Runs the server until it is stopped; 0 after a clean stop, 1 if the model could not be served."""
    from serve.app import create_app

    try:
        app = create_app(settings)
    except (OSError, ValueError) as e:  # an unreadable or empty token file
        print(f"yagg serve: error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5, lifespan="on"
    )
    server = _DrainingServer(config, app.state.yagg, settings.drain_timeout_s)
    server.run()
    state = app.state.yagg
    return 1 if state.status == "failed" else 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server, with SIGTERM draining the queue first (module doc) and the bound address printed."""

    def __init__(self, config: uvicorn.Config, state: Any, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._state = state
        self._drain_timeout_s = drain_timeout_s
        self._draining = False

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets or ():
                host, port = sock.getsockname()[:2]
                print(f"yagg serve: listening on http://{host}:{port}", flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not recorded as a captured signal: uvicorn would raise it again after shutting down, ending the process
        # by SIGTERM instead of with status 0.
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        threading.Thread(target=self._drain, name="yagg-drain", daemon=True).start()

    def _drain(self) -> None:
        log.warning(
            "SIGTERM: not ready; finishing the running batch and the queue (up to %.0f s)", self._drain_timeout_s
        )
        state = self._state
        state.status = "draining"
        deadline = time.monotonic() + self._drain_timeout_s
        while state.scheduler is not None and not state.scheduler.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the handlers of the last jobs send their answers
        self.should_exit = True
