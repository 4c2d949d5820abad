"""Miner registration: signed, for hotkeys registered on the subnet only."""

from __future__ import annotations

from fastapi import APIRouter

from common.protocol import MINERS_REGISTER, RegisterRequest, RegisterResponse
from orchestrator.deps import Orch, Signed, SignedBody, serve
from orchestrator.scheduler import SchedulerError

router = APIRouter(tags=["miners"])


@serve(router, MINERS_REGISTER)
async def register(
    req: Signed, orch: Orch, body: RegisterRequest = SignedBody(MINERS_REGISTER)
) -> RegisterResponse:
    """Join the run: get a stage, a session, the model, the data and the global weights to load."""
    if body.corpus_fingerprint != orch.spec.data.fingerprint:
        raise SchedulerError(
            409,
            "corpus_mismatch",
            f"your corpus fingerprint {body.corpus_fingerprint[:12]} differs from the run's "
            f"{orch.spec.data.fingerprint[:12]}; configure the same data source (IOTA_DATA_*)",
        )
    miner = orch.scheduler.register(req.hotkey, body.device, body.preferred_stage)
    return RegisterResponse(
        run_id=orch.run_id,
        session=miner.session,
        stage=miner.stage,
        model=orch.spec.model.to_dict(),
        data=orch.spec.data,
        training=orch.spec.training,
        weights=orch.epochs.joined(miner),
        poll_wait_s=orch.settings.poll_wait_s,
    )
