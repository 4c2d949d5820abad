"""The miner's loop: register, load the stage's global weights, then pull work, compute, upload, report.

Everything a miner receives is checked before use: downloaded bytes against the size and sha256 the
orchestrator vouched for, tensors against the run's boundary shape and dtype, finiteness and magnitude.
A bad input is reported with `blame_input`, so it costs the miner that produced it, not this one.

Stopping (the `stop` event, set by SIGINT or SIGTERM): the loop ends after the current step; retries of the
orchestrator and transfers end at their next try with `Stopping`, and an item given up that way is
reported failed (one try), so the orchestrator requeues it at once rather than at its deadline.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import torch
from bittensor.sp_core import Keypair
from safetensors.torch import save_file

from common.client import ApiError, ClockSkew, OrchestratorClient, Resync, Unavailable
from common.codec import CodecError, content_hash
from common.config import DataSettings
from common.data import Corpus, batch_tokens, make_corpus
from common.metrics import serve_daemon_metrics
from common.model import ModelConfig
from common.protocol import (
    MERGE_REPORT,
    MINERS_REGISTER,
    WORK_COMPLETE,
    WORK_FAIL,
    WORK_NEXT,
    ApplyReport,
    ArtifactRef,
    CompleteRequest,
    FailRequest,
    GlobalWeights,
    MergeReportRequest,
    MergeTask,
    ReduceReport,
    RegisterRequest,
    RegisterResponse,
    UploadReport,
    WorkItem,
    WorkKind,
    WorkRequest,
    work_kind,
)
from common.stopping import Stopping
from common.storage import StorageError, download_from_url, upload_to_url
from common.training import TrainerError
from common.wire import BoundaryWire
from miner.merge_participant import MergeFailed, MergeParticipant, Traffic
from miner.metrics import MinerMetrics, MinerStatusLine, MinerView
from miner.settings import MinerSettings
from miner.trainer import MinerTrainer

log = logging.getLogger("iota.miner")

_TIMINGS_EVERY_S = 10.0
# A refused clock is retried often and at a steady pace, not with the growing backoff of other refusals: once
# the clock is fixed (NTP catching up), the miner is back at work within seconds.
CLOCK_RETRY_S = 3.0


class BadInput(Exception):
    """The item's input is not what the orchestrator announced, or not a valid boundary tensor."""


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"IOTA_MINER_DEVICE={name} but torch sees no CUDA device")
    return name


class Timings:
    """Where a miner's time goes (compute, transfers, codec, talking to the orchestrator, waiting)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.counts[name] = self.counts.get(name, 0) + 1

    def as_dict(self) -> dict[str, object]:
        return {
            "wall_s": time.monotonic() - self.started,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "counts": dict(self.counts),
        }


class MinerWorker:
    def __init__(
        self,
        settings: MinerSettings,
        keypair: Keypair,
        data: DataSettings | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings, self.keypair = settings, keypair
        self.stop = stop or threading.Event()  # ends the loop, and every retry and transfer with it
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
        self.reg: RegisterResponse | None = None
        self.trainer: MinerTrainer | None = None
        self.merger: MergeParticipant | None = None
        self.traffic = Traffic()
        self.resync = False  # the orchestrator said our run or session is gone: register before more work
        self.clock_refused = False  # the orchestrator refuses our timestamps (said once, until it accepts)
        self.timings = Timings()
        self.metrics = MinerMetrics(keypair.ss58_address, self.device, settings.behavior, self.traffic)
        self.metrics.view = self._view
        self.status_line = MinerStatusLine(self.metrics)
        self._timings_at = self._status_at = time.monotonic()
        # Presigned URLs need no auth: a plain pool, kept apart from the signed orchestrator client.
        self._s3 = httpx.Client(timeout=settings.http_timeout_s)

    # -- registration -----------------------------------------------------------------------------------

    def register(self) -> RegisterResponse:
        gpu_gb = None
        if self.device.startswith("cuda"):
            gpu_gb = torch.cuda.get_device_properties(torch.device(self.device)).total_memory / 2**30
        reg = self.client.call(
            MINERS_REGISTER,
            RegisterRequest(
                device=self.device,
                gpu_memory_gb=gpu_gb,
                corpus_fingerprint=self.corpus.fingerprint,
                preferred_stage=self.settings.stage,
            ),
        )
        same_place = (
            self.reg is not None
            and self.trainer is not None
            and reg.run_id == self.reg.run_id
            and reg.stage == self.reg.stage
            and self.merger is not None
            and reg.weights.version == self.merger.version
        )
        if same_place:
            assert self.merger is not None
            # Same run, stage and global version: a new session starts from the global weights again (from
            # the local start-of-epoch copy, no download), as the orchestrator's record of it does.
            with self.timings.measure("checkpoint"):
                self.merger.load(reg.weights)
        else:
            self.trainer = MinerTrainer(
                ModelConfig.from_dict(reg.model),
                reg.stage,
                reg.training,
                seed=reg.weights.seed,
                device=self.device,
                behavior=self.settings.behavior,
            )
            self.merger = MergeParticipant(
                self.trainer,
                reg.training,
                hotkey=self.keypair.ss58_address,
                http=self._s3,
                policy=self.trainer.policy,
                traffic=self.traffic,
                stop=self.stop,
            )
            with self.timings.measure("checkpoint"):
                self.merger.load(reg.weights)
        self.reg, self.resync = reg, False
        log.info(
            "registered with run %s as stage %d of %d (session %d, %s, behavior %s)",
            reg.run_id,
            reg.stage,
            self._cfg().n_stages,
            reg.session,
            self.device,
            self.settings.behavior,
        )
        return reg

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> None:
        stop = self.stop
        serve_daemon_metrics(self.metrics.registry, self.settings.metrics_host, self.settings.metrics_port)
        backoff = 1.0
        while not stop.is_set():
            try:
                if self.reg is None or self.resync:
                    self.register()
                self.step()
                backoff = 1.0
                if self.clock_refused:
                    self.clock_refused = False
                    log.info("the orchestrator accepts this machine's clock again; back to work")
            except Stopping as error:
                log.info("stopping: %s", error)
                break
            except Resync as error:
                log.info("re-syncing with the orchestrator: %s", error.detail)
                self.resync = True
            except ClockSkew as error:
                self._clock_skewed(error)
                stop.wait(CLOCK_RETRY_S)
            except Unavailable as error:
                log.warning("orchestrator unreachable, will keep trying: %s", error)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except ApiError as error:
                log.error("the orchestrator refused a request: %s", error)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except (MergeFailed, StorageError, CodecError) as error:
                log.error("could not load the stage's global weights, will register again: %s", error)
                self.merger, self.resync = None, True
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            self._maybe_log_status()
        self._write_timings()
        if self.settings.snapshot_file and self.trainer is not None:
            stage = {"stage": str(self.trainer.stage)}  # it may have been moved since it registered
            save_file(self.trainer.weights(), str(self.settings.snapshot_file), metadata=stage)
            log.info("saved this stage's weights to %s", self.settings.snapshot_file)
        self.client.close()
        self._s3.close()

    def _clock_skewed(self, error: ClockSkew) -> None:
        """Say once, clearly, that this machine's clock is the problem; the retries that follow are quiet."""
        if self.clock_refused:
            log.debug("the clock is still refused: %s", error.detail)
            return
        self.clock_refused = True
        if error.offset_s is None:
            off = "off"
        else:
            side = "ahead of" if error.offset_s > 0 else "behind"
            off = f"off by about {abs(error.offset_s):.0f} s against the orchestrator ({side} its clock)"
        log.error(
            "this machine's clock is %s, so the orchestrator refuses every request (%s); synchronise it "
            "(`timedatectl set-ntp true`, chrony). Retrying every %.0f s.",
            off,
            error.detail,
            CLOCK_RETRY_S,
        )

    def _write_timings(self) -> None:
        # For benchmarks and the devnet: where this miner's time went, as JSON.
        path = self.settings.timings_file
        if path:
            with path.open("w") as handle:
                json.dump({"stage": self.reg.stage if self.reg else None, **self.timings.as_dict()}, handle)

    def step(self) -> None:
        """One request for work, and the item if one came."""
        reg = self._session()
        with self.timings.measure("poll"):
            resp = self.client.call(
                WORK_NEXT,
                WorkRequest(run_id=reg.run_id, session=reg.session, wait_s=self.settings.poll_wait_s),
                extra_timeout_s=self.settings.poll_wait_s,
            )
        trainer = self._trainer()
        for item_id in resp.cancelled:
            trainer.drop(item_id)
        if resp.move_to_stage is not None:
            log.info("the orchestrator moves this miner to stage %d", resp.move_to_stage)
            self.register()
            return
        if resp.reload is not None:
            self._reload(resp.reload)
        if resp.merge is not None:
            self.merge(resp.merge)
        if resp.item is not None:
            self.process(resp.item)

    # -- merging ------------------------------------------------------------------------------------------

    def merge(self, task: MergeTask) -> None:
        """Do this miner's part of a merge phase and report it."""
        merger, reg = self._merger(), self._session()
        report: UploadReport | ReduceReport | ApplyReport
        started = time.perf_counter()
        try:
            with self.timings.measure(f"merge_{task.phase}"):
                if task.phase == "upload":
                    report = merger.upload(task)
                elif task.phase == "reduce":
                    report = merger.reduce(task)
                else:
                    report = merger.apply(task)
        except (MergeFailed, StorageError, TrainerError) as error:
            # Left out of this merge; the orchestrator has this miner reload the checkpoint afterwards.
            log.warning("could not do the %s phase of the merge: %s", task.phase, error)
            self.metrics.counts.merge_failures[task.phase] += 1
            return
        self.metrics.merge_seconds.labels(task.phase).observe(time.perf_counter() - started)
        try:
            self.client.call(
                MERGE_REPORT,
                MergeReportRequest(
                    run_id=reg.run_id, session=reg.session, epoch=task.epoch, stage=task.stage, report=report
                ),
            )
        except Resync:
            raise
        except ApiError as error:
            log.warning("the %s report of the merge was refused: %s", task.phase, error)
            self.metrics.counts.merge_failures[task.phase] += 1
            return
        if task.phase == "apply":
            self.metrics.counts.merges += 1
            log.info("merged: stage %d now at version %d", task.stage, merger.version)

    def _reload(self, weights: GlobalWeights) -> None:
        try:
            with self.timings.measure("checkpoint"):
                self._merger().load(weights)
        except (MergeFailed, StorageError, CodecError, TrainerError) as error:
            log.warning(
                "could not load version %d of the weights (%s); registering again", weights.version, error
            )
            self.resync = True

    def process(self, item: WorkItem) -> None:
        reg = self._session()
        try:
            output, loss = self._compute(item)
        except Stopping:
            self._fail(item, "the miner is stopping", blame_input=False)
            raise
        except BadInput as error:
            log.warning("item %s: bad input, reporting it: %s", item.item_id, error)
            self._fail(item, str(error), blame_input=True)
            return
        except (TrainerError, StorageError) as error:
            log.warning("item %s failed: %s", item.item_id, error)
            self._fail(item, str(error), blame_input=False)
            return
        ref = None
        trainer = self._trainer()
        if output is not None:
            assert item.output is not None
            try:
                with self.timings.measure("upload"):
                    upload_to_url(item.output.url, output, client=self._s3, stop=self.stop)
            except Stopping:
                self._fail(item, "the miner is stopping", blame_input=False)
                raise
            except StorageError as error:
                self.metrics.counts.transfer_errors["upload"] += 1
                self._fail(item, f"upload failed: {error}", blame_input=False)
                return
            self.metrics.counts.work_uploaded += len(output)
            ref = ArtifactRef(key=item.output.key, size=len(output), sha256=content_hash(output))
        try:
            with self.timings.measure("report"):
                self.client.call(
                    WORK_COMPLETE,
                    CompleteRequest(
                        run_id=reg.run_id, session=reg.session, item_id=item.item_id, output=ref, loss=loss
                    ),
                )
        except Resync:
            trainer.discard()
            raise
        except ApiError as error:
            # The item was cancelled meanwhile (deadline) or the upload was refused: forget its state, and
            # take no step, since the orchestrator's record (which validators replay) has none.
            log.warning("item %s not accepted: %s", item.item_id, error)
            trainer.discard()
            trainer.drop(item.item_id)
            self.metrics.counts.failed += 1
            return
        trainer.commit()
        self.metrics.item_done(self._kind(item), reg.data.batch_size * reg.data.seq_len, loss)

    # -- compute ------------------------------------------------------------------------------------------

    def _compute(self, item: WorkItem) -> tuple[bytes | None, float | None]:
        trainer, cfg, reg = self._trainer(), self._cfg(), self._session()
        kind = work_kind(item.kind, item.stage, cfg.n_stages)
        if item.stage != reg.stage:
            raise TrainerError(f"item {item.item_id} is for stage {item.stage}; this miner runs {reg.stage}")
        if item.kind == "backward" and item.forward_item is None:
            raise TrainerError(f"backward item {item.item_id} names no forward")
        x = self._tokens(item) if item.kind == "forward" and item.stage == 0 else self._download(item)
        loss = None
        started = time.perf_counter()
        with self.timings.measure("compute"):
            if kind == "tail":
                loss, out = trainer.tail_step(x, self._tokens(item))
            elif kind == "forward":
                tokens = self._tokens(item) if trainer.module.needs_tokens else None  # never at the head
                out = self._forward_evicting(item.item_id, x, tokens)
            else:
                out = trainer.backward(item.forward_item or "", x)
        self.metrics.item_seconds.labels(kind).observe(time.perf_counter() - started)
        return (None if out is None else self._encode(out)), loss

    def _kind(self, item: WorkItem) -> WorkKind:
        return work_kind(item.kind, item.stage, self._cfg().n_stages)

    def _forward_evicting(self, item_id: str, x: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        trainer = self._trainer()
        if trainer.outstanding >= self._session().training.max_outstanding:
            # The orchestrator bounds this too; if a cancellation was lost (say, across its restart), the
            # oldest saved forward is the one whose backward will never come.
            trainer.drop_oldest()
        return trainer.forward(item_id, x, tokens)

    def _tokens(self, item: WorkItem) -> torch.Tensor:
        data = self._session().data
        if not item.samples or len(item.samples) != data.batch_size:
            raise BadInput(f"item {item.item_id} must name {data.batch_size} samples")
        try:
            return batch_tokens(self.corpus, item.samples, data.seq_len)
        except ValueError as error:
            raise BadInput(f"sample ids outside this corpus: {error}") from None

    def _wire(self) -> BoundaryWire:
        reg = self._session()
        return BoundaryWire.of(self._cfg(), reg.data.batch_size, reg.data.seq_len, reg.training)

    def _download(self, item: WorkItem) -> torch.Tensor:
        source = item.input
        if source is None:
            raise BadInput(f"item {item.item_id} has no input")
        wire = self._wire()
        if source.size > wire.max_bytes:
            raise BadInput(f"input of {source.size} bytes is larger than a boundary tensor")
        try:
            with self.timings.measure("download"):
                data = download_from_url(source.url, max_bytes=source.size, client=self._s3, stop=self.stop)
        except StorageError:
            self.metrics.counts.transfer_errors["download"] += 1
            raise
        self.metrics.counts.work_downloaded += len(data)
        with self.timings.measure("codec"):
            if len(data) != source.size or content_hash(data) != source.sha256:
                raise BadInput(f"{source.key} is not the object its producer reported (size or sha256)")
            try:
                return wire.decode(data)
            except CodecError as error:
                raise BadInput(f"{source.key}: {error}") from None

    def _encode(self, tensor: torch.Tensor) -> bytes:
        with self.timings.measure("codec"):
            return self._wire().encode(tensor)

    def _fail(self, item: WorkItem, reason: str, *, blame_input: bool) -> None:
        reg = self._session()
        self.metrics.counts.failed += 1
        self._trainer().discard()
        if item.kind == "forward":
            self._trainer().drop(item.item_id)
        try:
            self.client.call(
                WORK_FAIL,
                FailRequest(
                    run_id=reg.run_id,
                    session=reg.session,
                    item_id=item.item_id,
                    reason=reason[:500],
                    blame_input=blame_input,
                ),
            )
        except ApiError as error:
            log.info("could not report the failure of %s (%s); its deadline will", item.item_id, error.detail)

    # -- helpers ------------------------------------------------------------------------------------------

    def _session(self) -> RegisterResponse:
        if self.reg is None:
            raise Resync(409, "not_registered", "not registered yet")
        return self.reg

    def _trainer(self) -> MinerTrainer:
        if self.trainer is None:
            raise Resync(409, "not_registered", "not registered yet")
        return self.trainer

    def _merger(self) -> MergeParticipant:
        if self.merger is None:
            raise Resync(409, "not_registered", "not registered yet")
        return self.merger

    def _cfg(self) -> ModelConfig:
        return self._trainer().cfg

    def _view(self) -> MinerView:
        # Read from the metrics thread: plain attribute reads, never a call into torch.
        trainer, merger = self.trainer, self.merger
        return MinerView(
            stage=self.reg.stage if self.reg is not None else None,
            outstanding=trainer.outstanding if trainer is not None else 0,
            version=merger.version if merger is not None and merger.version >= 0 else None,
        )

    def _maybe_log_status(self) -> None:
        now = time.monotonic()
        if now - self._timings_at >= _TIMINGS_EVERY_S:
            self._timings_at = now
            self._write_timings()
        interval = self.settings.status_interval_s
        if interval and now - self._status_at >= interval:
            self._status_at = now
            log.info("%s", self.status_line.render())
