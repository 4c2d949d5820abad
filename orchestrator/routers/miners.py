"""Miner registration: signed, for hotkeys registered on the subnet only."""

from __future__ import annotations

from fastapi import APIRouter

from common.protocol import MINERS_REGISTER, RegisterRequest, RegisterResponse
from orchestrator.deps import Orch, Signed, SignedBody, serve

router = APIRouter(tags=["miners"])


@serve(router, MINERS_REGISTER)
async def register(
    req: Signed, orch: Orch, body: RegisterRequest = SignedBody(MINERS_REGISTER)
) -> RegisterResponse:
    """Join the run: get a stage, a session, the model, the data and the global weights to load."""
    return orch.miner_register(req.hotkey, body)
