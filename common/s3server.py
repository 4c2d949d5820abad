"""S3-compatible servers for the local network and the tests: moto embedded in this process, or nanio as a
child process that verifies signatures.

`EmbeddedS3` (moto) speaks real HTTP S3, presigned URLs and multipart included, but keeps objects in memory
and checks neither signatures nor expiry: a URL signed for one key, method or lifetime works for any other,
and even an unsigned PUT is stored. moto's state is per process, so two `EmbeddedS3` in one process share
their buckets. `iota devnet` and the tests use it, unless the devnet is given `--s3-endpoint`.

`NanioS3` runs nanio (`python -m nanio serve`, files in a temporary folder, a fresh secret) on a free
loopback port. nanio verifies AWS SigV4 as S3 does: the header form (what boto3 sends) and presigned query
strings, over the method, path, query and signed headers (host included), refusing an unknown key, a wrong
signature and an expired or future-dated URL with 403. It does not check a body against a signed
`x-amz-content-sha256` (presigned URLs carry UNSIGNED-PAYLOAD anyway, as on S3; the network checks content
hashes itself). tests/test_s3_verify.py shows what it enforces; it is the store on which the tests prove that
presigned URLs are scoped to one key, one method and a lifetime.

Why moto stays the default: speed does not decide it (bench/s3_servers.py, 300 presigned PUTs and GETs of
64 kB on our 2-core machine: moto 3.7 ms and 3.3 ms median, nanio 2.8 ms and 1.4 ms), but moto starts
in-process in about a millisecond (nanio: 0.2 s and more, and another process to stop), keeps nothing on
disk, and is the mature one; nanio is 0.1.x. Neither server is meant to face anything but this machine.

Standalone: `python -m common.s3server --port 9000` serves moto until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import httpx
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from common.config import LOCAL_S3_ACCESS_KEY_ID, LOCAL_S3_SECRET_ACCESS_KEY, S3Settings
from common.storage import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9000
LOCAL_S3_REGION = "us-east-1"


class _LocalS3:
    """What both local servers share: the context manager and the settings that point at them."""

    _host: str
    _port: int
    # The credentials `settings` hands out: moto takes any; nanio is started with these.
    _access_key = LOCAL_S3_ACCESS_KEY_ID
    _secret_key = LOCAL_S3_SECRET_ACCESS_KEY

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def __enter__(self) -> Self:
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
        if not self.running:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() first")
        return f"http://{self._host}:{self._port}"

    def settings(self, bucket: str = "iota") -> S3Settings:
        """S3Settings pointing at this server, with its credentials."""
        return S3Settings(
            endpoint_url=self.endpoint_url,
            region=LOCAL_S3_REGION,
            bucket=bucket,
            access_key_id=SecretStr(self._access_key),
            secret_access_key=SecretStr(self._secret_key),
        )


class EmbeddedS3(_LocalS3):
    """moto's threaded server on `host:port` (port 0 picks a free one); use as a context manager."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, *, verbose: bool = False) -> None:
        self._host = host
        self._port = port
        self._verbose = verbose
        self._server: ThreadedMotoServer | None = None

    def start(self) -> Self:
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

    @property
    def running(self) -> bool:
        return self._server is not None


class NanioS3(_LocalS3):
    """nanio, a SigV4-verifying S3 server, as a child process on a free loopback port, its files in a
    temporary folder removed on stop; use as a context manager.

    `preexec_fn` runs in the child before exec (say, one that ties the child's life to the caller's, as
    the devnet's `_die_with_parent` does for its processes). The port is found free, released and handed
    to nanio, so another process could take it first: start tries again on a new port when nanio exits
    before it answers.
    """

    START_TIMEOUT_S = 30.0
    _START_TRIES = 3

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        *,
        data_dir: Path | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self._host = host
        self._port = 0
        self._given_dir = data_dir
        self._preexec_fn = preexec_fn
        # A fresh secret, not the well-known local default: only a holder of `settings()` gets in.
        self._secret_key = secrets.token_hex(16)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("NanioS3 is already running")
        if importlib.util.find_spec("nanio") is None:
            raise RuntimeError("nanio is not installed: `pip install nanio` (it is in the dev extra)")
        self._dir = self._given_dir or Path(tempfile.mkdtemp(prefix="iota-nanio-"))
        (self._dir / "data").mkdir(parents=True, exist_ok=True)
        try:
            for attempt in range(1, self._START_TRIES + 1):
                if self._spawn_and_wait(last=attempt == self._START_TRIES):
                    return self
        except BaseException:
            self.stop()
            raise
        raise AssertionError("unreachable: the last try raises")

    def _spawn_and_wait(self, *, last: bool) -> bool:
        """Start nanio on a fresh port; True once it answers, False if it exited (the port was taken)
        and this is not the `last` try; raises if it does not answer in time."""
        assert self._dir is not None
        self._port = free_port(self._host)
        log_path = self._dir / "nanio.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NANIO_")}
        env.update(NANIO_ACCESS_KEY=self._access_key, NANIO_SECRET_KEY=self._secret_key)
        # No access log: a line per request would fill the log with the hot path's transfers.
        with log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                [
                    *[sys.executable, "-m", "nanio", "serve"],
                    *["--data-dir", str(self._dir / "data"), "--host", self._host, "--port", str(self._port)],
                    *["--region", LOCAL_S3_REGION, "--log-level", "warning", "--no-access-log"],
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self._preexec_fn,
            )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    self._proc = None
                    if last:
                        raise RuntimeError(f"nanio exited at start; its log: {_tail(log_path)}")
                    return False
                try:
                    http.get(f"http://{self._host}:{self._port}/")  # 403 without credentials: it answers
                    return True
                except httpx.TransportError:
                    time.sleep(0.05)
        raise RuntimeError(
            f"nanio did not answer within {self.START_TIMEOUT_S:.0f} s; log: {_tail(log_path)}"
        )

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None and self._given_dir is None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    @property
    def running(self) -> bool:
        return self._proc is not None


class ExternalS3:
    """A store this process does not run (`iota devnet --s3-endpoint`): `start` creates its bucket if
    missing, so a wrong endpoint or credentials fail before any process starts; `stop` leaves it be."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings

    def start(self) -> Self:
        ObjectStore.from_settings(self._settings, attempts=1).ensure_bucket()
        return self

    def stop(self) -> None:
        pass

    @property
    def endpoint_url(self) -> str:
        """The configured endpoint; "" for AWS S3 (boto3 picks the region's)."""
        return self._settings.endpoint_url or ""

    def settings(self) -> S3Settings:
        return self._settings


def settings_env(settings: S3Settings) -> dict[str, str]:
    """The IOTA_S3_* environment that makes a child process's S3Settings equal `settings`."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"IOTA_S3_{name.upper()}"] = "" if value is None else str(value)  # "": the default (None)
    return env


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as error:
        return f"(unreadable: {error})"


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
