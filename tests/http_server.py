"""Run an ASGI app on a real uvicorn server in a background thread, for tests that speak real HTTP.

Usage: `with serve_app(app) as base_url: httpx.get(f"{base_url}/health")`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class _ServerThread(threading.Thread):
    """Runs `server` and keeps any exception, so a failed start is reported instead of timing out."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket) -> None:
        super().__init__(name="uvicorn-test-server", daemon=True)
        self.server = server
        self.sock = sock
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as error:  # reported to the test thread by serve_app
            self.error = error


def _bound_socket(host: str) -> socket.socket:
    # Bind here and hand the socket to uvicorn: asking the OS for a free port and binding it later races
    # with other tests doing the same. proto must be IPPROTO_TCP (not 0) or asyncio skips TCP_NODELAY on the
    # accepted connections, and Nagle plus delayed ACKs add ~40 ms to every request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@contextmanager
def serve_app(
    app: Any,
    *,
    host: str = "127.0.0.1",
    startup_timeout_s: float = 10.0,
    shutdown_timeout_s: float = 10.0,
) -> Iterator[str]:
    """Serve `app` on a free port of `host` and yield its base URL; stop the server on exit."""
    sock = _bound_socket(host)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="auto",
        # Bounded so a client that holds a connection open cannot hang the test session on exit.
        timeout_graceful_shutdown=max(1, int(shutdown_timeout_s / 2)),
    )
    server = uvicorn.Server(config)
    thread = _ServerThread(server, sock)
    thread.start()
    try:
        _wait_started(thread, startup_timeout_s)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout_s)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn did not stop within {shutdown_timeout_s} s")


def _wait_started(thread: _ServerThread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not thread.server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn exited before it started serving") from thread.error
        if time.monotonic() > deadline:
            raise TimeoutError(f"uvicorn did not start within {timeout_s} s")
        time.sleep(0.005)
