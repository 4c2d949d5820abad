"""The live dashboard: one HTML page (`GET /dashboard`) that polls its data (`GET /v1/dashboard`). Both are
public and read-only, like /v1/status; the page loads nothing from anywhere else."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from common.protocol import (
    DASHBOARD_DATA,
    DASHBOARD_PAGE,
    DashboardData,
)
from orchestrator.deps import Orch, serve

router = APIRouter(tags=["dashboard"])

# The page may talk to this orchestrator only; a dependency on any other host would be refused here.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@serve(router, DASHBOARD_DATA)
async def data(orch: Orch) -> DashboardData:
    """Everything the dashboard page shows, in one read."""
    return orch.dashboard_data()


@serve(router, DASHBOARD_PAGE, response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The live dashboard: one self-contained HTML page that polls `GET /v1/dashboard`."""
    html = resources.files("orchestrator").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"content-security-policy": _CSP, "cache-control": "no-cache"})
