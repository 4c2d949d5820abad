"""FastAPI dependencies: the orchestrator behind the app, verified callers and their signed bodies; and
`serve`, which puts an endpoint of the table (`common.protocol.endpoints`) on a router.

No `from __future__ import annotations` here: FastAPI reads the annotations of a dependency's `__call__`
(the signed bodies') as objects, and cannot resolve them from strings on an instance.
"""

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar, cast

from fastapi import APIRouter, Depends, Request, params
from pydantic import BaseModel, ValidationError

from common.auth import VerifiedRequest
from common.protocol.endpoints import JSON, Auth, Endpoint
from orchestrator.errors import RequestRejected
from orchestrator.service import Orchestrator

M = TypeVar("M", bound=BaseModel)
F = TypeVar("F", bound=Callable[..., Any])


def orchestrator_of(request: Request) -> Orchestrator:
    orchestrator: Orchestrator = request.app.state.orchestrator
    return orchestrator


async def get_orchestrator(request: Request) -> Orchestrator:
    """The dependency. Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a thread
    hop on every request that, under load, queued requests behind the pool's 40 threads (bench/load.py)."""
    return orchestrator_of(request)


async def signed(request: Request) -> VerifiedRequest:
    """A request signed (Epistula) by a hotkey registered on the subnet; 401/403/413 otherwise."""
    return await orchestrator_of(request).verify(request)


# Route parameters: `req: Signed` for a verified, registered caller (`req: Validator` for a validator);
# `orch: Orch` for the orchestrator. FastAPI runs each dependency once per request, so a route and its
# signed body share one verification (a second would be refused as a replay).
Signed = Annotated[VerifiedRequest, Depends(signed)]


async def validator(request: Request, req: Signed) -> VerifiedRequest:
    """A signed request from a hotkey with a validator permit and enough stake; 403 for anyone else."""
    orchestrator_of(request).check_validator(req.hotkey)
    return req


Validator = Annotated[VerifiedRequest, Depends(validator)]
Orch = Annotated[Orchestrator, Depends(get_orchestrator)]


def parse(model: type[M], req: VerifiedRequest) -> M:
    """The signed body as `model`; 422 with the first problems spelled out."""
    try:
        return model.model_validate_json(req.body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise RequestRejected(422, "invalid_body", f"{model.__name__}: {problems}") from None


class BodyDependency(Generic[M]):
    """A dependency: the signed body of `endpoint`'s route, as the endpoint's request model. One subclass
    per kind of caller, since FastAPI learns a dependency's own dependencies from its signature."""

    def __init__(self, endpoint: Endpoint[M, Any]) -> None:
        if endpoint.request is None:
            raise ValueError(f"{endpoint} takes no signed body")
        self.endpoint = endpoint
        self.model: type[M] = endpoint.request


class _SignedBody(BodyDependency[M]):
    async def __call__(self, req: Signed) -> M:
        return parse(self.model, req)


class _ValidatorBody(BodyDependency[M]):
    async def __call__(self, req: Validator) -> M:
        return parse(self.model, req)


def SignedBody(endpoint: Endpoint[M, Any]) -> M:  # named like FastAPI's `Body`, `Depends`
    """`body: Model = SignedBody(ENDPOINT)`: the route's body parsed as the table's request model (422
    `invalid_body` otherwise), once the caller's signature, and on a validator endpoint its permit and
    stake, were checked. Typed as the model, so a type checker catches a route that names another one."""
    body = _ValidatorBody(endpoint) if endpoint.auth is Auth.VALIDATOR else _SignedBody(endpoint)
    return cast(M, Depends(body))


def request_body(endpoint: Endpoint[Any, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring the endpoint's request model as its route's JSON body.

    Signed routes read the raw body themselves (the signature covers its bytes; see `SignedBody`), so
    FastAPI cannot see the model; without this the schema would say the route takes no body, and a client
    generator or a fuzzer would never send one. (`orchestrator.app` adds the models to the components.)
    """
    assert endpoint.request is not None
    ref = {"$ref": f"#/components/schemas/{endpoint.request.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _bodies(route: Callable[..., Any]) -> list[Endpoint[Any, Any]]:
    """The endpoints whose `SignedBody` the route takes."""
    defaults = [p.default for p in inspect.signature(route).parameters.values()]
    return [
        d.dependency.endpoint
        for d in defaults
        if isinstance(d, params.Depends) and isinstance(d.dependency, BodyDependency)
    ]


def serve(router: APIRouter, endpoint: Endpoint[Any, Any], **options: Any) -> Callable[[F], F]:
    """The decorator that serves `endpoint` on `router`: its method, path, response model and (signed)
    body schema come from the table; `options` are FastAPI's other route options.

    A signed endpoint's route must take `SignedBody(endpoint)`, and a public one no signed body, so the body
    a route parses is the one its schema declares, by construction.
    """
    if endpoint.request is not None:
        options["openapi_extra"] = request_body(endpoint)
    if endpoint.media_type == JSON:
        options["response_model"] = endpoint.response
    add = router.api_route(endpoint.path, methods=[endpoint.method], **options)

    def decorate(route: F) -> F:
        expected = [endpoint] if endpoint.request is not None else []
        if _bodies(route) != expected:
            raise TypeError(f"{route.__qualname__} serves {endpoint}: take `body = SignedBody(...)` of it")
        return add(route)

    return decorate
