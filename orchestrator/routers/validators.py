"""Validators: register, lease a replay task, report its verdict, report the scores of a weights round. Only
for hotkeys with a validator permit and enough stake; miners get 403."""

from __future__ import annotations

from fastapi import APIRouter

from common.protocol import (
    VALIDATORS_REGISTER,
    VALIDATORS_SCORES,
    VALIDATORS_TASK,
    VALIDATORS_VERDICT,
    Ack,
    ScoresReport,
    ValidatorRegisterRequest,
    ValidatorRegisterResponse,
    ValidatorTaskRequest,
    ValidatorTaskResponse,
    VerdictRequest,
)
from orchestrator.deps import Orch, SignedBody, Validator, serve

router = APIRouter(tags=["validators"])


@serve(router, VALIDATORS_REGISTER)
async def register(
    req: Validator, orch: Orch, body: ValidatorRegisterRequest = SignedBody(VALIDATORS_REGISTER)
) -> ValidatorRegisterResponse:
    """Join as a validator: the run's model, data and training settings, to replay miners' work with."""
    return orch.validator_register(req.hotkey, body)


@serve(router, VALIDATORS_TASK)
async def task(
    req: Validator, orch: Orch, body: ValidatorTaskRequest = SignedBody(VALIDATORS_TASK)
) -> ValidatorTaskResponse:
    """A replay task leased to the caller, waiting up to `wait_s` for one."""
    return await orch.validator_task(req.hotkey, body)


@serve(router, VALIDATORS_VERDICT)
async def verdict(req: Validator, orch: Orch, body: VerdictRequest = SignedBody(VALIDATORS_VERDICT)) -> Ack:
    """Report the verdict of a replay the caller leased."""
    orch.validator_verdict(req.hotkey, body)
    return Ack()


@serve(router, VALIDATORS_SCORES)
async def scores(req: Validator, orch: Orch, body: ScoresReport = SignedBody(VALIDATORS_SCORES)) -> Ack:
    """The caller's latest scores and the weights it set on the chain, for the dashboard. Only the latest
    report per validator is kept, in memory; it decides nothing (weights take effect on the chain)."""
    orch.validator_scores(req.hotkey, body)
    return Ack()
