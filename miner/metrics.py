"""The miner's Prometheus metrics and its status line, both read from one set of counts.

The worker bumps `MinerCounts` as it works; `/metrics` (on IOTA_MINER_METRICS_PORT) and the periodic status
line read the same numbers, so the two never disagree. Merge and checkpoint traffic is counted by
`miner.merge_participant.Traffic` and added at read time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric

from common.metrics import (
    SECONDS_BUCKETS,
    StateCollector,
    counter,
    gauge,
    human_bytes,
    labelled_counter,
    labelled_gauge,
)
from miner.merge_participant import Traffic

KINDS = ("forward", "backward", "tail")
MERGE_PHASES = ("upload", "reduce", "apply")


@dataclass
class MinerCounts:
    """Everything this miner did since it started (work items, bytes, failures, merges)."""

    items: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    samples: int = 0  # forwards computed and accepted (each is one sample at this stage)
    tokens: int = 0
    failed: int = 0  # items given up or not accepted
    work_uploaded: int = 0  # activations and gradients; merge traffic is in `Traffic`
    work_downloaded: int = 0
    transfer_errors: dict[str, int] = field(default_factory=lambda: {"upload": 0, "download": 0})
    merges: int = 0  # apply phases done: this miner's stage moved to a new global version
    merge_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MERGE_PHASES, 0))
    last_loss: float | None = None


@dataclass
class MinerView:
    """What the worker knows right now, read at scrape time (None before it registers)."""

    stage: int | None
    outstanding: int
    version: int | None


class MinerMetrics:
    def __init__(self, hotkey: str, device: str, behavior: str, traffic: Traffic) -> None:
        self.hotkey, self.device, self.behavior, self.traffic = hotkey, device, behavior, traffic
        self.counts = MinerCounts()
        self.view: Callable[[], MinerView] = lambda: MinerView(None, 0, None)
        self.registry = CollectorRegistry()
        self.item_seconds = Histogram(
            "iota_miner_item_seconds",
            "Compute seconds of each work item, by kind (transfers and codec not included).",
            ["kind"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.merge_seconds = Histogram(
            "iota_miner_merge_phase_seconds",
            "Seconds this miner spent on each merge phase it did.",
            ["phase"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StateCollector(self._families))

    # -- events -------------------------------------------------------------------------------------------

    def item_done(self, kind: str, tokens: int, loss: float | None) -> None:
        c = self.counts
        c.items[kind] += 1
        if kind != "backward":
            c.samples += 1
            c.tokens += tokens
        if loss is not None and math.isfinite(loss):
            c.last_loss = loss

    def uploaded(self) -> int:
        return self.counts.work_uploaded + self.traffic.uploaded

    def downloaded(self) -> int:
        return self.counts.work_downloaded + self.traffic.downloaded

    # -- exposition ---------------------------------------------------------------------------------------

    def _families(self) -> Iterator[Metric]:
        c, view = self.counts, self.view()
        yield labelled_gauge(
            "iota_miner_info",
            "This miner's hotkey, device and behaviour (always 1).",
            ["hotkey", "device", "behavior"],
            [([self.hotkey, self.device, self.behavior], 1.0)],
        )
        yield gauge(
            "iota_miner_stage", "The stage this miner trains (-1 before it registers).", _or(view.stage)
        )
        yield gauge(
            "iota_miner_weights_version", "The global weights version this miner holds.", _or(view.version)
        )
        yield gauge(
            "iota_miner_outstanding_forwards", "Forwards whose backward this miner awaits.", view.outstanding
        )
        yield labelled_counter(
            "iota_miner_items",
            "Work items this miner computed and had accepted, by kind.",
            ["kind"],
            [([kind], n) for kind, n in c.items.items()],
        )
        yield counter("iota_miner_samples", "Samples this miner ran forward (accepted).", c.samples)
        yield counter(
            "iota_miner_tokens", "Tokens in those samples (batch size x sequence length).", c.tokens
        )
        yield counter("iota_miner_items_failed", "Items this miner gave up or had refused.", c.failed)
        yield counter(
            "iota_miner_upload_bytes", "Bytes uploaded to the bucket (work and merging).", self.uploaded()
        )
        yield counter(
            "iota_miner_download_bytes",
            "Bytes downloaded from the bucket (work, merging, checkpoints).",
            self.downloaded(),
        )
        yield labelled_counter(
            "iota_miner_transfer_errors",
            "Work transfers to or from the bucket that failed after their retries, by direction.",
            ["direction"],
            [([d], n) for d, n in c.transfer_errors.items()],
        )
        yield counter(
            "iota_miner_merges", "Merges this miner applied (its stage's new global weights).", c.merges
        )
        yield labelled_counter(
            "iota_miner_merge_failures",
            "Merge phases this miner could not do (it is left out of that merge), by phase.",
            ["phase"],
            [([p], n) for p, n in c.merge_failures.items()],
        )
        if c.last_loss is not None:
            yield gauge("iota_miner_loss", "The latest loss this miner computed (tail only).", c.last_loss)


def _or(value: int | None) -> int:
    return -1 if value is None else value


class MinerStatusLine:
    """'stage 1 | 42 items (fwd 20, bwd 22) | 1,830 tok/s | up 1.2 MB, down 0.9 MB | 0 failed | ...'"""

    def __init__(self, metrics: MinerMetrics) -> None:
        self.metrics = metrics
        self._last = (time.monotonic(), metrics.counts.tokens)

    def render(self) -> str:
        m, c, view = self.metrics, self.metrics.counts, self.metrics.view()
        now = time.monotonic()
        since, tokens_before = self._last
        self._last = (now, c.tokens)
        rate = (c.tokens - tokens_before) / (now - since) if now > since else 0.0
        short = {"forward": "fwd", "backward": "bwd", "tail": "tail"}
        kinds = ", ".join(f"{short[k]} {n:,}" for k, n in c.items.items() if n)
        parts = [
            "not registered" if view.stage is None else f"stage {view.stage}",
            f"{sum(c.items.values()):,} items" + (f" ({kinds})" if kinds else ""),
            f"{rate:,.0f} tok/s",
            f"up {human_bytes(m.uploaded())}, down {human_bytes(m.downloaded())}",
            f"{c.failed} failed, {sum(c.transfer_errors.values())} transfer errors",
            f"{c.merges} merges, weights v{_or(view.version)}",
        ]
        if c.last_loss is not None:
            parts.append(f"loss {c.last_loss:.3f}")
        return " | ".join(parts)
