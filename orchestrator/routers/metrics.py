"""`GET /metrics`: the orchestrator's Prometheus metrics. Public and unsigned, like /health: it shows
counts and timings, nothing a miner could use against another."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.protocol import METRICS
from orchestrator.deps import Orch, serve

router = APIRouter(tags=["public"])


@serve(router, METRICS, response_class=PlainTextResponse)
async def metrics(orch: Orch) -> Response:
    """The orchestrator's Prometheus metrics, in the Prometheus text format."""
    # On the event loop, where the scheduler's state changes, so a scrape reads it consistently.
    return Response(generate_latest(orch.metrics.registry), media_type=CONTENT_TYPE_LATEST)
