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
    EpochProgress,
    MergeSummary,
    MinerThroughput,
    ValidatorScores,
)
from orchestrator.dashboard_state import consensus
from orchestrator.deps import Orch, serve
from orchestrator.routers.public import run_status
from orchestrator.service import Orchestrator

router = APIRouter(tags=["dashboard"])

RECENT_MERGES = 12
# The page may talk to this orchestrator only; a dependency on any other host would be refused here.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def dashboard_data(orch: Orchestrator) -> DashboardData:
    sched, spec, epochs, board = orch.scheduler, orch.spec, orch.epochs, orch.dashboard
    tokens_per_sample = spec.data.batch_size * spec.data.seq_len
    neurons = orch.registry.neurons
    miners = []
    for m in sched.miners.values():
        seconds = sched.seconds_per_sample(m)
        rate = 1.0 / seconds if seconds else None
        neuron = neurons.get(m.hotkey)
        miners.append(
            MinerThroughput(
                hotkey=m.hotkey,
                uid=neuron.uid if neuron else None,
                stage=m.stage,
                state="active" if m.active else "inactive",
                items_completed=m.items_completed,
                samples_per_s=rate,
                tokens_per_s=None if rate is None else rate * tokens_per_sample,
            )
        )
    board.losses.update(orch.db)  # what arrived since the background task's last read (one page)
    back = RECENT_MERGES // spec.model.n_stages + 1  # epochs that hold the most recent merges
    recent = epochs.records(max(0, epochs.state.epoch - back), (back + 1) * spec.model.n_stages)
    reports = {hotkey: received.report for hotkey, received in board.scores.items()}
    validators = [
        ValidatorScores(
            hotkey=hotkey,
            uid=neuron.uid if (neuron := neurons.get(hotkey)) else None,
            stake=neuron.stake if neuron else 0.0,
            received_at=received.received_at,
            report=received.report,
        )
        for hotkey, received in sorted(board.scores.items())
    ]
    chain_weights = board.chain_weights
    if chain_weights and any(chain_weights.values()):
        source = "chain"
    else:
        source = "validators" if reports else "none"
    return DashboardData(
        at=orch.clock(),
        status=run_status(orch),
        progress=EpochProgress(
            epoch=epochs.state.epoch,
            phase=epochs.state.phase,
            phase_since=epochs.state.since,
            samples_trained=sched.completed - epochs.state.completed_at_start,
            merge_every_samples=orch.settings.merge_every_samples,
            epoch_max_s=orch.settings.epoch_max_s,
        ),
        miners=sorted(miners, key=lambda m: (m.stage, m.hotkey)),
        loss=board.losses.points(),
        losses_recorded=board.losses.count,
        throughput=board.throughput.rates(tokens_per_sample),
        merges=[
            MergeSummary(
                epoch=r.epoch,
                stage=r.stage,
                outcome=r.outcome,
                version=r.version,
                participants=len(r.participants),
                flagged=len(r.flagged),
                finished_at=r.finished_at,
            )
            for r in recent[-RECENT_MERGES:]
        ],
        validators=validators,
        consensus=consensus(
            reports,
            neurons,
            chain_weights,
            lambda hotkey: m.stage if (m := sched.miners.get(hotkey)) else None,
        ),
        chain_weights=chain_weights,
        weights_source=source,
    )


@serve(router, DASHBOARD_DATA)
async def data(orch: Orch) -> DashboardData:
    """Everything the dashboard page shows, in one read."""
    return dashboard_data(orch)


@serve(router, DASHBOARD_PAGE, response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The live dashboard: one self-contained HTML page that polls `GET /v1/dashboard`."""
    html = resources.files("orchestrator").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"content-security-policy": _CSP, "cache-control": "no-cache"})
