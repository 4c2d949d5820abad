"""FastAPI dependencies: the orchestrator behind the app, and verified, registered callers."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from common.auth import VerifiedRequest
from orchestrator.scheduler import SchedulerError
from orchestrator.service import Orchestrator

M = TypeVar("M", bound=BaseModel)


def get_orchestrator(request: Request) -> Orchestrator:
    orchestrator: Orchestrator = request.app.state.orchestrator
    return orchestrator


async def signed(request: Request) -> VerifiedRequest:
    """A request signed (Epistula) by a hotkey registered on the subnet; 401/403/413 otherwise."""
    return await get_orchestrator(request).verify(request)


async def validator(request: Request) -> VerifiedRequest:
    """A signed request from a hotkey with a validator permit and enough stake; 403 for anyone else."""
    req = await signed(request)
    orch = get_orchestrator(request)
    problem = orch.registry.validator_problem(req.hotkey, orch.settings.validator_min_stake)
    if problem is not None:
        raise SchedulerError(403, "not_a_validator", problem)
    return req


# Route parameters: `req: Signed` for a verified, registered caller (`req: Validator` for a validator);
# `orch: Orch` for the orchestrator.
Signed = Annotated[VerifiedRequest, Depends(signed)]
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
        raise SchedulerError(422, "invalid_body", f"{model.__name__}: {problems}") from None
