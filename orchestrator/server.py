"""Build the orchestrator from settings and serve it with uvicorn (`iota orchestrator`)."""

from __future__ import annotations

import logging
import signal
import socket
from types import FrameType

import uvicorn

from common.chain import make_chain
from common.config import AuthSettings, ChainSettings, DataSettings, ModelSettings, S3Settings
from common.data import make_corpus
from common.stopping import StopSignals
from common.storage import ObjectStore
from orchestrator.app import create_app
from orchestrator.db import StateDB
from orchestrator.service import Orchestrator, run_spec
from orchestrator.settings import OrchestratorSettings

log = logging.getLogger("iota.orchestrator")


def build_orchestrator(
    settings: OrchestratorSettings | None = None,
    *,
    s3: S3Settings | None = None,
    chain: ChainSettings | None = None,
    auth: AuthSettings | None = None,
    model: ModelSettings | None = None,
    data: DataSettings | None = None,
) -> Orchestrator:
    settings = settings or OrchestratorSettings()
    s3, chain, auth = s3 or S3Settings(), chain or ChainSettings(), auth or AuthSettings()
    model, data = model or ModelSettings(), data or DataSettings()
    corpus = make_corpus(data)
    spec = run_spec(settings, model, data, corpus)
    store = ObjectStore.from_settings(s3)
    store.ensure_bucket()
    return Orchestrator(
        settings,
        spec=spec,
        corpus=corpus,
        db=StateDB(settings.state_path),
        store=store,
        chain=make_chain(chain),
        auth=auth,
        metagraph_refresh_s=chain.metagraph_ttl_s,
    )


# Requests under way (long polls included: they are capped by IOTA_ORCH_POLL_WAIT_S) get this long to
# finish after a stop signal; then they are cancelled, the background loops stop, and the process exits.
GRACEFUL_S = 5


class _Server(uvicorn.Server):
    """uvicorn's server with the daemons' stop promise (`common.stopping`): the first SIGINT or SIGTERM
    starts uvicorn's graceful shutdown and arms the deadline, a second one exits at once. Exiting at any
    point keeps the state whole: every write to SQLite commits before the request it serves is answered."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop_signals = StopSignals("orchestrator")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signals.handle(sig, frame)
        super().handle_exit(sig, frame)


def serve(orchestrator: Orchestrator, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM (see `_Server`). Binds the socket itself so that port 0 works and
    TCP_NODELAY is set."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    log.info(
        "orchestrator for run %s listening on http://%s:%d", orchestrator.run_id, host, sock.getsockname()[1]
    )
    config = uvicorn.Config(
        create_app(orchestrator),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_S,
        # Miners talk to the orchestrator all the time, with their compute and transfers in between: keep
        # their connections open rather than uvicorn's 5 s, so they are not re-opened (and raced) every item.
        timeout_keep_alive=75,
    )
    # uvicorn raises the stop signal again once it has shut down, under the handler it found: the default
    # SIGINT one for both signals makes that a KeyboardInterrupt here, so a stop ends with exit status 0
    # (PM2 stops with SIGINT) rather than a traceback or death by SIGTERM.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
