"""An embedded S3-compatible server (moto) for the local network and the tests.

It speaks real HTTP S3, presigned URLs and multipart included, but keeps objects in memory and checks
neither signatures nor expiry: never expose it beyond the machine. moto's state is per process, so two
`EmbeddedS3` in one process share their buckets.

Standalone: `python -m common.s3server --port 9000` serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType, TracebackType

from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from common.config import LOCAL_S3_ACCESS_KEY_ID, LOCAL_S3_SECRET_ACCESS_KEY, S3Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000


class EmbeddedS3:
    """moto's threaded server on `host:port` (port 0 picks a free one); use as a context manager."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, *, verbose: bool = False) -> None:
        self._host = host
        self._port = port
        self._verbose = verbose
        self._server: ThreadedMotoServer | None = None

    def start(self) -> EmbeddedS3:
        if self._server is not None:
            raise RuntimeError("EmbeddedS3 is already running")
        if not self._verbose:
            # werkzeug logs every request at INFO and adds its own stdout handler unless a level is set.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address=self._host, port=self._port, verbose=self._verbose)
        server.start()
        self._server = server
        self._port = server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one once started, even when 0 was asked for)."""
        return self._port

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("EmbeddedS3 is not running; call start() first")
        return f"http://{self._host}:{self._port}"

    def settings(self, bucket: str = "iota") -> S3Settings:
        """S3Settings pointing at this server, with dummy credentials."""
        return S3Settings(
            endpoint_url=self.endpoint_url,
            region="us-east-1",
            bucket=bucket,
            access_key_id=SecretStr(LOCAL_S3_ACCESS_KEY_ID),
            secret_access_key=SecretStr(LOCAL_S3_SECRET_ACCESS_KEY),
        )


def serve_forever(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve until SIGINT or SIGTERM (call from the main thread: only it may install signal handlers)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with EmbeddedS3(host, port) as s3:
            log.info("embedded S3 serving at %s", s3.endpoint_url)
            # A bounded wait keeps the main thread returning to the interpreter, where signal handlers run.
            while not stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Embedded S3-compatible server (moto) for local networks.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="Address to bind; keep it on loopback.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Port to bind; 0 picks a free one.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_forever(args.host, args.port)


if __name__ == "__main__":
    main()
