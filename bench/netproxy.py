"""A loopback TCP proxy that counts the bytes it carries and injects network faults, switchable at run time.

`bench/wire.py --s3` counts the bytes of one pipeline hop through it; the fault tests
(`tests/test_faults_e2e.py`, `tests/test_stop_e2e.py`) put it between one miner and the orchestrator, or
between everybody and S3, and switch its `mode` (not shipped: no role runs it):

- `pass`: carry the bytes both ways (the default);
- `cut`: reset every open connection, and every new one as soon as it is accepted: a dead link;
- `error`: answer whatever a client sends with S3's `503 SlowDown` and close: a store that is failing;
- `stall`: carry nothing and answer nothing, holding the connection, so that clients wait into their
  timeouts; when the stall ends the held connections are reset, as a middlebox that lost their state would.

Modes act per chunk read, so a request that straddles a switch meets the new mode part way: that is a
transient failure of some kind, which is what every client here must survive anyway.
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from typing import Literal, get_args

Mode = Literal["pass", "cut", "error", "stall"]
MODES: tuple[Mode, ...] = get_args(Mode)

# What S3 answers when it sheds load; clients retry it (botocore's standard mode, `common.storage`).
_S3_UNAVAILABLE_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
S3_UNAVAILABLE = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    + f"Content-Length: {len(_S3_UNAVAILABLE_BODY)}\r\n\r\n".encode()
    + _S3_UNAVAILABLE_BODY
)


class _Link:
    """One client connection and its upstream connection; closing either closes both."""

    def __init__(self, client: socket.socket, server: socket.socket | None) -> None:
        self.client, self.server = client, server

    def close(self) -> None:
        # Shutting the sockets down wakes the pump blocked reading the other one; each pump closes its own.
        for sock in (self.client, self.server):
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class LoopbackProxy:
    """A proxy on 127.0.0.1 to `upstream` ("host:port"), counting the bytes that pass each way.

    Each chunk is counted before it is forwarded, so once a client has its response every byte of that
    exchange is in the counts. With `keep`, every byte sent upstream is kept in `requests` too."""

    def __init__(self, upstream: str, *, keep: bool = False) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._mode_changed = threading.Condition(self._lock)
        self._mode: Mode = "pass"
        self._links: set[_Link] = set()
        self.sent = 0  # client to server
        self.received = 0  # server to client
        self.keep = keep
        self.requests = bytearray()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        """Switch at once: `cut` resets the open connections; leaving `stall` resets the ones it held."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        with self._lock:
            self._mode = mode
            self._mode_changed.notify_all()
            doomed = list(self._links) if mode == "cut" else []
        for link in doomed:
            link.close()

    def reset(self) -> tuple[int, int]:
        """The counts (sent, received) since the last reset, zeroing them."""
        with self._lock:
            counts, self.sent, self.received = (self.sent, self.received), 0, 0
        return counts

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            self._closing = True
            self._mode_changed.notify_all()  # held connections let go
            links = list(self._links)
        for link in links:
            link.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._mode == "cut":
                client.close()
                continue
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()  # upstream is down: the client sees its connection closed, as it would
                continue
            link = _Link(client, server)
            with self._lock:
                self._links.add(link)
            threading.Thread(target=self._pump, args=(link, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, False), daemon=True).start()

    def _pump(self, link: _Link, upstream: bool) -> None:
        src, dst = (link.client, link.server) if upstream else (link.server, link.client)
        assert src is not None and dst is not None
        try:
            while chunk := src.recv(1 << 16):
                if not self._forward(link, chunk, upstream):
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            link.close()
            src.close()
            with self._lock:
                self._links.discard(link)

    def _forward(self, link: _Link, chunk: bytes, upstream: bool) -> bool:
        """Whether `chunk` goes on (counted); otherwise the mode dealt with it and the link is done."""
        with self._lock:
            mode = self._mode
            if mode == "pass" or (mode == "error" and not upstream):
                # In `error` an answer to a request sent before the switch still gets through.
                if upstream:
                    self.sent += len(chunk)
                    if self.keep:
                        self.requests += chunk
                else:
                    self.received += len(chunk)
                return True
            if mode == "stall":
                # Hold: nothing moves until the stall ends, then the connection is reset.
                self._mode_changed.wait_for(lambda: self._mode != "stall" or self._closing)
        if mode == "error":
            with suppress(OSError):
                link.client.sendall(S3_UNAVAILABLE)
        return False
