"""The orchestrator's FastAPI application: routers, the version header, and one error format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.auth import AuthHTTPException
from common.protocol import HEADER_PROTOCOL, HEADER_RUN, PROTOCOL_VERSION, ErrorBody
from common.protocol.endpoints import signed_endpoints
from orchestrator.errors import RequestRejected
from orchestrator.loops import background_loops
from orchestrator.routers import dashboard, merge, metrics, miners, public, validators, work
from orchestrator.service import Orchestrator

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "not_allowed",
    413: "too_large",
    422: "invalid_body",
    429: "rate_limited",
    503: "unavailable",
}


# Every error answer, on every route, is an ErrorBody (the handlers below); declared so that the schema says
# so, instead of FastAPI's default 422 body, which this app never sends.
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Refused: `code` says why (see docs/protocol.md)."},
    "5XX": {
        "model": ErrorBody,
        "description": "Unavailable for now (storage, replay cache: retry), or a bug.",
    },
}


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorBody(code=code, detail=detail).model_dump(), status_code=status, headers=headers)


class ProtocolHeaders:
    """Refuses a request that names another protocol version (426) and stamps every answer with the
    orchestrator's protocol version and run id.

    Plain ASGI rather than `@app.middleware("http")`: starlette's BaseHTTPMiddleware runs every request in
    an extra task with a streamed response, the largest single cost per request under load (bench/load.py).
    """

    def __init__(self, app: ASGIApp, run_id: str) -> None:
        self.app = app
        self.stamp = {HEADER_PROTOCOL: str(PROTOCOL_VERSION), HEADER_RUN: run_id}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = Headers(scope=scope).get(HEADER_PROTOCOL)
        if sent is not None and sent != str(PROTOCOL_VERSION):
            detail = (
                f"this orchestrator speaks protocol {PROTOCOL_VERSION}, the request says {sent}; "
                "upgrade the client"
            )
            await _error(426, "protocol_mismatch", detail, self.stamp)(scope, receive, send)
            return

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.stamp.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, stamped)


def create_app(orchestrator: Orchestrator) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(orchestrator.registry.refresh)
        tasks = [asyncio.create_task(loop) for loop in background_loops(orchestrator)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(
        title="IOTA orchestrator",
        version=str(PROTOCOL_VERSION),
        description="Assigns stages, routes work through S3, and keeps the record of who did what.",
        lifespan=lifespan,
        responses=_ERROR_RESPONSES,
    )
    app.state.orchestrator = orchestrator
    app.include_router(public.router)
    app.include_router(dashboard.router)
    app.include_router(metrics.router)
    app.include_router(miners.router)
    app.include_router(work.router)
    app.include_router(merge.router)
    app.include_router(validators.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete_schema(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(ProtocolHeaders, run_id=orchestrator.run_id)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        return _error(error.status, error.code, error.detail)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = error.code if isinstance(error, AuthHTTPException) and error.code else None
        code = code or _CODES.get(error.status_code, f"http_{error.status_code}")
        return _error(error.status_code, code, str(error.detail), dict(error.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", str(error.errors()[:5]))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the caller's fault: still the one error format (the schema promises ErrorBody for 5XX
        # too), with no internals in it. Starlette re-raises afterwards, so the server logs the traceback;
        # this runs outside the middleware, hence the headers here.
        headers = {HEADER_PROTOCOL: str(PROTOCOL_VERSION), HEADER_RUN: orchestrator.run_id}
        return _error(500, "internal_error", "the orchestrator failed on this request; it is logged", headers)

    return app


def _complete_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with the models of signed bodies (the table's, declared by `deps.serve`) in its components,
    where their references point (FastAPI adds only the models it parses itself), and errors as JSON on
    every route (FastAPI gives declared responses the route's media type: text/plain on /metrics)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for endpoint in signed_endpoints():
        model = endpoint.request
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for sub_name, sub in definition.pop("$defs", {}).items():
            components.setdefault(sub_name, sub)
        components.setdefault(model.__name__, definition)
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status in _ERROR_RESPONSES:
                operation["responses"][status]["content"] = error
    return schema
