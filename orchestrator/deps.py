"""FastAPI dependencies: the orchestrator behind the app, and verified, registered callers."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from common.auth import VerifiedRequest
from orchestrator.scheduler import SchedulerError
from orchestrator.service import Orchestrator

M = TypeVar("M", bound=BaseModel)


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


async def validator(request: Request) -> VerifiedRequest:
    """A signed request from a hotkey with a validator permit and enough stake; 403 for anyone else."""
    req = await signed(request)
    orch = orchestrator_of(request)
    problem = orch.registry.validator_problem(req.hotkey, orch.settings.validator_min_stake)
    if problem is not None:
        raise SchedulerError(403, "not_a_validator", problem)
    return req


# Route parameters: `req: Signed` for a verified, registered caller (`req: Validator` for a validator);
# `orch: Orch` for the orchestrator.
Signed = Annotated[VerifiedRequest, Depends(signed)]
Validator = Annotated[VerifiedRequest, Depends(validator)]
Orch = Annotated[Orchestrator, Depends(get_orchestrator)]


# Request models declared with `signed_body`, by name, for the app to add to its OpenAPI components.
BODY_MODELS: dict[str, type[BaseModel]] = {}


def signed_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring `model` as a signed route's JSON body.

    Signed routes read the raw body themselves (the signature covers its bytes; see `parse`), so FastAPI
    cannot see the model; without this the schema would say the route takes no body, and a client
    generator or a fuzzer would never send one. Use the model the route hands to `parse`.
    """
    BODY_MODELS[model.__name__] = model
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def parse(model: type[M], req: VerifiedRequest) -> M:
    """The signed body as `model`; 422 with the first problems spelled out."""
    try:
        return model.model_validate_json(req.body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors()[:5]
        )
        raise SchedulerError(422, "invalid_body", f"{model.__name__}: {problems}") from None
