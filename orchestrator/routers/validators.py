"""Validators: register, lease a replay task, report its verdict, report the scores of a weights round. Only
for hotkeys with a validator permit and enough stake; miners get 403."""

from __future__ import annotations

import asyncio

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
from orchestrator.errors import RequestRejected

router = APIRouter(tags=["validators"])

_POLL_S = 0.5  # how often a held task request looks again; tasks appear only when merges close


def _same_run(orch: Orch, run_id: str) -> None:
    if run_id != orch.run_id:
        raise RequestRejected(409, "run_mismatch", f"this orchestrator runs {orch.run_id}; register again")


@serve(router, VALIDATORS_REGISTER)
async def register(
    req: Validator, orch: Orch, body: ValidatorRegisterRequest = SignedBody(VALIDATORS_REGISTER)
) -> ValidatorRegisterResponse:
    """Join as a validator: the run's model, data and training settings, to replay miners' work with."""
    if body.corpus_fingerprint != orch.spec.data.fingerprint:
        raise RequestRejected(
            409,
            "corpus_mismatch",
            f"your corpus fingerprint {body.corpus_fingerprint[:12]} differs from the run's "
            f"{orch.spec.data.fingerprint[:12]}; configure the same data source (IOTA_DATA_*)",
        )
    orch.db.add_event(orch.clock(), "validator_registered", body.device, miner=req.hotkey)
    return ValidatorRegisterResponse(
        run_id=orch.run_id,
        model=orch.spec.model.to_dict(),
        data=orch.spec.data,
        training=orch.spec.training,
        seed=orch.spec.seed,
        poll_wait_s=orch.settings.poll_wait_s,
    )


@serve(router, VALIDATORS_TASK)
async def task(
    req: Validator, orch: Orch, body: ValidatorTaskRequest = SignedBody(VALIDATORS_TASK)
) -> ValidatorTaskResponse:
    """A replay task leased to the caller, waiting up to `wait_s` for one."""
    _same_run(orch, body.run_id)
    loop = asyncio.get_running_loop()
    until = loop.time() + min(body.wait_s, orch.settings.poll_wait_s)
    while True:
        leased = orch.validation.lease(req.hotkey)
        remaining = until - loop.time()
        if leased is not None or remaining <= 0:
            return ValidatorTaskResponse(task=leased)
        await asyncio.sleep(min(_POLL_S, remaining))


@serve(router, VALIDATORS_VERDICT)
async def verdict(req: Validator, orch: Orch, body: VerdictRequest = SignedBody(VALIDATORS_VERDICT)) -> Ack:
    """Report the verdict of a replay the caller leased."""
    _same_run(orch, body.run_id)
    orch.validation.verdict(req.hotkey, body.task_id, body.verdict)
    return Ack()


@serve(router, VALIDATORS_SCORES)
async def scores(req: Validator, orch: Orch, body: ScoresReport = SignedBody(VALIDATORS_SCORES)) -> Ack:
    """The caller's latest scores and the weights it set on the chain, for the dashboard. Only the latest
    report per validator is kept, in memory; it decides nothing (weights take effect on the chain)."""
    _same_run(orch, body.run_id)
    orch.dashboard.receive(req.hotkey, body)
    return Ack()
