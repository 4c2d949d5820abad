"""The validator's loop: register, lease replay tasks and report verdicts; beside it, on an interval,
score the miners and set weights on the chain.

Replays run in the main thread, one at a time; scoring runs in its own thread so that a long replay never
delays the weights. Neither touches a miner's requests: a replay starts only after the shadowed epoch has
merged, from objects the orchestrator kept for it.

Stopping (the `stop` event, set by SIGINT or SIGTERM) ends both loops: retries of the orchestrator and
downloads end at their next try with `Stopping`, and a replay cut short that way reports nothing (its lease
expires to another validator).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import torch
from bittensor.sp_core import Keypair

from common.chain import Chain
from common.client import ApiError, OrchestratorClient, Resync, Unavailable
from common.config import DataSettings
from common.data import Corpus, make_corpus
from common.metrics import serve_daemon_metrics
from common.model import ModelConfig
from common.protocol import (
    LEDGER,
    LOSSES,
    STATUS,
    VALIDATORS_REGISTER,
    VALIDATORS_SCORES,
    VALIDATORS_TASK,
    VALIDATORS_VERDICT,
    DownloadSource,
    LossRecord,
    MinerScoreEntry,
    ReplayVerdict,
    ScoresReport,
    ValidationTask,
    ValidatorRegisterRequest,
    ValidatorRegisterResponse,
    ValidatorTaskRequest,
    VerdictRequest,
)
from common.stopping import Stopping
from common.storage import StorageError, download_from_url
from validator.clasp import estimate_effects, quality
from validator.metrics import ValidatorMetrics, ValidatorStatusLine
from validator.replay import ReplayError, replay, replay_mode
from validator.scoring import MinerScore, ScoringConfig, score_miners, weights_from_scores
from validator.settings import ValidatorSettings

log = logging.getLogger("iota.validator")


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"IOTA_VALIDATOR_DEVICE={name} but torch sees no CUDA device")
    return name


@dataclass
class WeightsRound:
    """One scoring round: what was computed and what was set."""

    at: float
    epoch: int
    scores: dict[str, MinerScore]
    weights: dict[int, float]
    clasp_flagged: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "epoch": self.epoch,
            "scores": {hotkey: asdict(score) for hotkey, score in self.scores.items()},
            "weights": {str(uid): w for uid, w in self.weights.items()},
            "clasp_flagged": self.clasp_flagged,
        }


# How long a stopping validator waits for a weights round under way (it is a daemon thread: after this the
# process exits without it; the next round, after a restart, sets weights again).
_SCORER_JOIN_S = 3.0


class ValidatorDaemon:
    def __init__(
        self,
        settings: ValidatorSettings,
        keypair: Keypair,
        chain: Chain,
        data: DataSettings | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings, self.keypair, self.chain = settings, keypair, chain
        self.stop = stop or threading.Event()  # ends both loops, and every retry and download with them
        self.device = pick_device(settings.device)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.corpus: Corpus = make_corpus(data or DataSettings())
        self.client = OrchestratorClient(
            settings.orchestrator_url,
            keypair,
            timeout_s=settings.http_timeout_s,
            retry_for_s=settings.retry_for_s,
            stop=self.stop,
        )
        self.scoring = ScoringConfig(
            window_epochs=settings.score_window_epochs,
            decay=settings.score_decay,
            partition_weight=settings.partition_weight,
            burn_fraction=settings.burn_fraction,
            burn_uid=settings.burn_uid,
        )
        self.reg: ValidatorRegisterResponse | None = None
        self.losses: list[LossRecord] = []
        self._losses_after = 0
        self.replays = {"passed": 0, "failed": 0, "unreplayable": 0}
        self.last_round: WeightsRound | None = None
        # Every hotkey CLASP flagged in any round: what the devnet counts false positives from.
        self.flagged_ever: set[str] = set()
        self._s3 = httpx.Client(timeout=settings.http_timeout_s)
        self.metrics = ValidatorMetrics(self)
        self.status_line = ValidatorStatusLine(self.metrics)

    # -- registration ---------------------------------------------------------------------------------------

    def register(self) -> ValidatorRegisterResponse:
        self.reg = self.client.call(
            VALIDATORS_REGISTER,
            ValidatorRegisterRequest(device=self.device, corpus_fingerprint=self.corpus.fingerprint),
        )
        log.info("validating run %s on %s", self.reg.run_id, self.device)
        return self.reg

    # -- the loops ------------------------------------------------------------------------------------------

    def run(self) -> None:
        stop = self.stop
        serve_daemon_metrics(self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port)
        scorer = threading.Thread(target=self._score_loop, args=(stop,), name="scores", daemon=True)
        scorer.start()
        backoff = 1.0
        status_at = time.monotonic()
        while not stop.is_set():
            interval = self.settings.status_interval_s
            if interval and time.monotonic() - status_at >= interval:
                status_at = time.monotonic()
                log.info("%s", self.status_line.render())
            try:
                if self.reg is None:
                    self.register()
                self.step()
                backoff = 1.0
            except Stopping as error:
                log.info("stopping: %s", error)
                break
            except Resync as error:
                log.info("re-registering with the orchestrator: %s", error.detail)
                self.reg = None
            except (Unavailable, ApiError) as error:
                log.warning("orchestrator: %s; will keep trying", error)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
        scorer.join(timeout=_SCORER_JOIN_S)
        self.client.close()
        self._s3.close()

    def step(self) -> ReplayVerdict | None:
        """Lease one task (waiting up to poll_wait_s), replay it and report the verdict."""
        reg = self._registered()
        resp = self.client.call(
            VALIDATORS_TASK,
            ValidatorTaskRequest(run_id=reg.run_id, wait_s=self.settings.poll_wait_s),
            extra_timeout_s=self.settings.poll_wait_s,
        )
        if resp.task is None:
            return None
        return self.validate(resp.task)

    def validate(self, task: ValidationTask) -> ReplayVerdict | None:
        reg = self._registered()
        mode = replay_mode(task.device, self.device)
        try:
            verdict = replay(
                task,
                cfg=ModelConfig.from_dict(reg.model),
                training=reg.training,
                data=reg.data,
                corpus=self.corpus,
                fetch=self._fetch,
                device=self.device,
                autocast=mode.autocast,
                horizon=mode.horizon,
                tolerances=mode.tolerances,
            )
        except Stopping:
            raise
        except (ReplayError, StorageError) as error:
            # Not the miner's fault: report nothing, and the lease expires to another validator.
            self.replays["unreplayable"] += 1
            log.warning("could not replay task %s (%s): %s", task.task_id, task.miner[:8], error)
            return None
        except Exception:  # our own failure (out of memory, a bug): blame nobody, and keep validating
            self.replays["unreplayable"] += 1
            log.exception("replaying task %s (%s) failed", task.task_id, task.miner[:8])
            return None
        self.client.call(
            VALIDATORS_VERDICT, VerdictRequest(run_id=reg.run_id, task_id=task.task_id, verdict=verdict)
        )
        self.replays["passed" if verdict.passed else "failed"] += 1
        self.metrics.replay_seconds.observe(verdict.replay_s)
        log.info(
            "replayed epoch %d stage %d of %s: %s (%d ops, %.1f s)%s",
            task.epoch,
            task.stage,
            task.miner[:8],
            "passed" if verdict.passed else "FAILED",
            verdict.ops,
            verdict.replay_s,
            f": {verdict.failure}" if verdict.failure else "",
        )
        return verdict

    def _fetch(self, source: DownloadSource) -> bytes:
        return download_from_url(source.url, max_bytes=source.size, client=self._s3, stop=self.stop)

    def _score_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.weights_interval_s):
            if self.reg is None:
                continue
            try:
                self.set_weights()
            except Stopping:
                return
            except Exception as error:  # a failed round must not stop the validator; the next one retries
                self.metrics.round_failures += 1
                log.warning("could not set weights this round: %s", error)

    # -- scores and weights -----------------------------------------------------------------------------

    def compute_weights(self) -> WeightsRound:
        """Score every miner from the ledger and CLASP over the latest losses; no side effects on chain."""
        status = self.client.call(STATUS)
        first = max(0, status.epoch - self.scoring.window_epochs)
        ledgers = self.client.call(LEDGER, params={"after_epoch": first, "limit": 1000})
        self._pull_losses()
        effects = estimate_effects(self.losses, status.n_stages)
        metagraph = self.chain.metagraph()
        scores = score_miners(ledgers, quality(effects), metagraph, self.scoring)
        return WeightsRound(
            at=time.time(),
            epoch=status.epoch,
            scores=scores,
            weights=weights_from_scores(scores, metagraph, self.scoring),
            clasp_flagged=sorted({e.hotkey for e in effects if e.flagged}),
        )

    def set_weights(self) -> WeightsRound:
        result = self.compute_weights()
        self.chain.set_weights(self.keypair, result.weights)
        self.last_round = result
        self.metrics.rounds += 1
        self.flagged_ever.update(result.clasp_flagged)
        self.report_scores(result)
        if self.settings.report_file:
            report = {
                **result.as_json(),
                "replays": dict(self.replays),
                "clasp_flagged_ever": sorted(self.flagged_ever),
            }
            tmp = self.settings.report_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(self.settings.report_file)
        penalized = sum(s.penalized for s in result.scores.values())
        log.info(
            "set weights on %d uids after epoch %d (%d miners penalized, %d flagged by CLASP; replays %s)",
            len(result.weights),
            result.epoch,
            penalized,
            len(result.clasp_flagged),
            ", ".join(f"{k} {v}" for k, v in self.replays.items()),
        )
        return result

    def report_scores(self, result: WeightsRound) -> bool:
        """Tell the orchestrator what this round scored and set, for its dashboard. The weights are already
        on the chain, so a failure here is only logged."""
        if self.reg is None:
            return False
        flagged = set(result.clasp_flagged)
        try:
            report = ScoresReport(
                run_id=self.reg.run_id,
                epoch=result.epoch,
                at=result.at,
                scores={
                    hotkey: MinerScoreEntry(score=s.score, penalized=s.penalized, flagged=hotkey in flagged)
                    for hotkey, s in result.scores.items()
                },
                weights=result.weights,
            )
            self.client.call(VALIDATORS_SCORES, report)
        except Exception as error:  # the dashboard missing a round must never cost a weights round
            log.warning("could not report this round's scores to the orchestrator: %s", error)
            return False
        return True

    def _pull_losses(self) -> None:
        while True:
            page = self.client.call(LOSSES, params={"after": self._losses_after, "limit": 10_000})
            if not page.records:
                break
            self.losses = (self.losses + page.records)[-self.settings.clasp_records :]
            self._losses_after = page.next_after

    def _registered(self) -> ValidatorRegisterResponse:
        if self.reg is None:
            raise Resync(409, "not_registered", "not registered yet")
        return self.reg
