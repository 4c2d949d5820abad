"""CLASP (Contribution Loss Assessment via Sampling of Pathways): which miner makes the loss worse.

Every sample crosses one miner per stage (its pathway) and only the tail sees the loss, so a miner that
corrupts its outputs cannot be seen at its own stage. The orchestrator picks sample ids from its seeded
schedule whichever miner asks, so a sample's difficulty does not depend on who handles it (routing
itself is first come, first served: which miners share a pathway depends on timing, which the joint fit
below separates); a miner that damages its samples is the one whose samples have a higher loss than
those of its peers at the same stage, whatever the other stages did.

The estimator, on the orchestrator's loss log (`common.protocol.LossRecord`):

1. Clean. Records with a loss that is not a finite number in [0, `MAX_LOSS`], or a pathway that is not
   `n_stages` hotkeys, are dropped (a hostile log never makes it raise); the rest are ordered by seq.
2. Model. loss_i = trend(i) + sum over stages s of a[s][miner of sample i at s] + noise. The trend is the
   training curve (the loss falls over time); a[s][m] is miner m's additive effect at stage s.
3. Fit by backfitting, up to `iterations` sweeps (it stops early once no effect moves by 1e-6 nats):
   - trend = running median, over a centered window of `detrend_window` records, of the losses less the
     current effects. Centered, because the validator reads the log after the fact: a trailing window lags
     a falling loss by half a window, which would offset early samples more than late ones wherever the
     curve is steep. A median, because one cheater's bad samples in the window must not move it.
   - each stage in turn: a miner's raw effect is the mean of its samples' partial residuals (loss less
     trend less the other stages' effects), each clipped to `clip_scales` robust scales of the stage's
     partial residuals. The mean, not a median, because a miner that corrupts a fraction f of its
     outputs by D nats moves the mean by f*D but barely moves the median; the clip bounds what one
     outlying sample (a freak text, a hostile tail) can do. At the measured spread of honest per-sample
     losses (about 0.5 nats) the clip is about 3 nats, above the 0.7 to 2.2 nats that random outputs cost
     on average in the measured runs (docs/clasp.md).
   - centering: effects are made relative to a reference miner at the stage, the *lower median* of the
     raw effects of the miners with at least `min_samples` samples (all miners if none has). It is the
     median for an odd count, so with three or more miners one bad miner cannot drag the baseline; for an
     even count it is the lower middle one. That matters for two miners: the plain median would be their
     mean, so a bad miner would show only +d/2 (and the honest one -d/2); the lower one as reference puts
     the honest miner at 0 and the bad one at +d. Damage only raises the loss, so the better of two is
     the natural baseline; with many miners the lower median is not the minimum, whose noise would push
     every other miner up.
4. Uncertainty. The effect is a difference of two (clipped) means, the miner's over its n samples and the
   reference's over n_ref, so stderr = sqrt(s^2/n + s_ref^2/n_ref), where s is the standard deviation of
   the miner's clipped partial residuals, floored at that of all residuals (under random routing every
   miner sees the same noise, and a handful of samples must not look more precise than the population).
   A standard deviation, not MAD * 1.4826: a cheat's sparse damage leaks into every other stage's
   residuals as a heavy tail (10% of samples +2 nats), which the MAD ignores but the mean does not; with
   the MAD, honest stage-0 miners reached z = 4.5 in the bench (2 of 120 honest pairs in one cell).
   z = effect / stderr. The reference miner itself has effect 0 and z 0.
5. Flag. A miner is flagged at a stage when it has at least `min_samples` samples, effect >= `min_effect`
   nats, z >= `z_threshold`, and the stage is not the tail (with `skip_tail`). Only positive effects
   (worse loss) are flagged: a better-than-typical miner is not a cheat.

The tail. The tail's miner computes and reports the loss itself, so it can make its own effect look like
anything (report a lower loss, say); its effect is estimated, so that it does not leak into the others',
but with `skip_tail` (the default) it is never flagged. A lying tail is caught by replay (the validator
recomputes the loss). The same power lets a lying tail frame an upstream miner by inflating the loss of
samples routed through it; CLASP cannot tell that from the upstream miner's own damage, and relies on the
replay of tails to keep them honest.

Assumptions: effects are additive across stages; after detrending, the noise is stationary and
independent across samples; routing is random, so each miner's samples are exchangeable with its peers'
(a miner fed only easy or hard samples would look better or worse than it is). Limits: CLASP compares
miners at the same stage, so a stage with one miner has nothing to compare with (its effect is 0 and it is
never flagged, whatever it does), and if most miners at a stage cheat alike, the cheats are the baseline;
a miner needs samples (see the table in docs/clasp.md, from `bench/clasp_sim.py`: with two miners per
stage, real losses of the tiny model and a falling trend, a body miner sending random outputs was flagged
in every trial from 64 records when it did so on every forward, in >= 90% of trials from 512 records on a
quarter of its forwards and from 2048 on a tenth; 0 of 10,080 honest (miner, trial) pairs were flagged).

`quality` turns the effects into the factor the scores are multiplied by: 0 for a miner flagged at any
stage, 1 otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.protocol import MAX_LOSS, LossRecord

MAD_TO_SD = 1.4826  # MAD of a normal sample times this is its standard deviation
_CONVERGED = 1e-6  # nats: a sweep that moves no effect by more than this ends the fit
_MIN_SCALE = 1e-9  # nats: keeps z finite when every residual is identical (a synthetic, noiseless log)


@dataclass(frozen=True)
class ClaspConfig:
    detrend_window: int = 64  # records in the running median that removes the training trend
    z_threshold: float = 4.0
    min_effect: float = 0.05  # nats: a flag needs both a large effect and a significant z
    min_samples: int = 8  # a miner with fewer samples at a stage is never flagged there
    iterations: int = 20  # backfitting sweeps at most
    skip_tail: bool = True  # never flag the tail's miners (they report the loss; replay checks them)
    clip_scales: float = 6.0  # partial residuals are clipped to this many robust scales before the mean

    def __post_init__(self) -> None:
        # `not x > 0` also refuses NaN.
        if self.detrend_window < 3:
            raise ValueError("detrend_window must be at least 3 records")
        if not self.z_threshold > 0 or not self.clip_scales > 0:
            raise ValueError("z_threshold and clip_scales must be positive")
        if not self.min_effect >= 0:
            raise ValueError("min_effect must be non-negative")
        if self.min_samples < 1 or self.iterations < 1:
            raise ValueError("min_samples and iterations must be at least 1")


@dataclass(frozen=True)
class MinerEffect:
    hotkey: str
    stage: int
    samples: int
    effect: float  # nats added to a sample's loss, relative to the stage's reference miner
    stderr: float
    z: float
    flagged: bool


@dataclass(frozen=True)
class _Log:
    """The usable records as arrays: losses (N,) and, per stage, each record's miner index."""

    losses: np.ndarray
    miners: list[np.ndarray]  # per stage: (N,) index into hotkeys[stage]
    hotkeys: list[list[str]]

    @property
    def counts(self) -> list[np.ndarray]:
        return [np.bincount(m, minlength=len(h)) for m, h in zip(self.miners, self.hotkeys, strict=True)]


def _usable(record: LossRecord, n_stages: int) -> bool:
    # Checks types too: records may come from model_construct or a hostile peer, and must never raise.
    # Exact type checks (no bool, no subclasses) are also the fast path over thousands of records.
    try:
        loss, pathway, seq = record.loss, record.pathway, record.seq
    except AttributeError:
        return False
    if type(loss) not in (float, int) or not 0 <= loss <= MAX_LOSS:  # NaN fails the comparison too
        return False
    if type(seq) is not int or type(pathway) not in (list, tuple) or len(pathway) != n_stages:
        return False
    return all(type(hotkey) is str for hotkey in pathway)


def _clean(records: Sequence[LossRecord], n_stages: int) -> _Log:
    kept = sorted((r for r in records if _usable(r, n_stages)), key=lambda r: r.seq)
    hotkeys: list[list[str]] = []
    miners: list[np.ndarray] = []
    for stage in range(n_stages):
        index: dict[str, int] = {}
        column = [index.setdefault(r.pathway[stage], len(index)) for r in kept]
        hotkeys.append(list(index))
        miners.append(np.asarray(column, dtype=np.int64))
    return _Log(np.asarray([float(r.loss) for r in kept], dtype=np.float64), miners, hotkeys)


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median of a centered window of `window` values around each value; near the ends the window is
    shifted inside the series (not shrunk), so that every median is over as many values."""
    n = len(values)
    if n <= window:
        return np.full(n, np.median(values)) if n else values.copy()
    medians = np.median(np.lib.stride_tricks.sliding_window_view(values, window), axis=1)
    starts = np.clip(np.arange(n) - window // 2, 0, n - window)
    return medians[starts]


def robust_scale(values: np.ndarray) -> float:
    """MAD * 1.4826: the standard deviation of normal noise, unmoved by a minority of outliers."""
    if len(values) == 0:
        return 0.0
    return float(np.median(np.abs(values - np.median(values))) * MAD_TO_SD)


def _reference(raw: np.ndarray, counts: np.ndarray, min_samples: int) -> int:
    """The index of the stage's reference miner: the lower median of the raw effects of the miners with
    enough samples (of all miners when none has)."""
    eligible = np.flatnonzero(counts >= min_samples)
    if len(eligible) == 0:
        eligible = np.flatnonzero(counts > 0)
    ordered = eligible[np.argsort(raw[eligible], kind="stable")]
    return int(ordered[(len(ordered) - 1) // 2])


def _clipped_partials(partial: np.ndarray, clip_scales: float) -> np.ndarray:
    center = np.median(partial)
    limit = clip_scales * max(robust_scale(partial), _MIN_SCALE)
    return np.clip(partial, center - limit, center + limit)


@dataclass
class _Fit:
    effects: list[np.ndarray]  # per stage, per miner, relative to the reference
    references: list[int]
    trend: np.ndarray


def _fitted(log: _Log, effects: list[np.ndarray], skip: int | None = None) -> np.ndarray:
    """Sum over stages (but `skip`) of each record's miner effect."""
    total = np.zeros(len(log.losses))
    for stage, (miners, a) in enumerate(zip(log.miners, effects, strict=True)):
        if stage != skip:
            total += a[miners]
    return total


def _backfit(log: _Log, config: ClaspConfig) -> _Fit:
    counts = log.counts
    effects = [np.zeros(len(h)) for h in log.hotkeys]
    references = [0] * len(effects)
    trend = running_median(log.losses, config.detrend_window)
    for _ in range(config.iterations):
        trend = running_median(log.losses - _fitted(log, effects), config.detrend_window)
        moved = 0.0
        for stage, miners in enumerate(log.miners):
            partial = _clipped_partials(
                log.losses - trend - _fitted(log, effects, skip=stage), config.clip_scales
            )
            raw = np.bincount(miners, weights=partial, minlength=len(counts[stage])) / np.maximum(
                counts[stage], 1
            )
            references[stage] = _reference(raw, counts[stage], config.min_samples)
            new = raw - raw[references[stage]]
            moved = max(moved, float(np.max(np.abs(new - effects[stage]))))
            effects[stage] = new
        if moved < _CONVERGED:
            break
    return _Fit(effects, references, trend)


def _spreads(values: np.ndarray, miners: np.ndarray, size: int) -> np.ndarray:
    """Each miner's sample standard deviation of `values` (0 with fewer than 2 samples)."""
    n = np.bincount(miners, minlength=size).astype(float)
    mean = np.bincount(miners, weights=values, minlength=size) / np.maximum(n, 1)
    squares = np.bincount(miners, weights=(values - mean[miners]) ** 2, minlength=size)
    return np.sqrt(squares / np.maximum(n - 1, 1))


def _stage_effects(log: _Log, fit: _Fit, stage: int, pooled: float, config: ClaspConfig) -> list[MinerEffect]:
    counts = log.counts[stage]
    reference = fit.references[stage]
    partial = _clipped_partials(
        log.losses - fit.trend - _fitted(log, fit.effects, skip=stage), config.clip_scales
    )
    scales = np.maximum(_spreads(partial, log.miners[stage], len(counts)), max(pooled, _MIN_SCALE))
    ref_var = scales[reference] ** 2 / counts[reference]
    tail = stage == len(log.miners) - 1
    out: list[MinerEffect] = []
    for index, hotkey in enumerate(log.hotkeys[stage]):
        n = int(counts[index])
        effect = float(fit.effects[stage][index])
        if index == reference:
            stderr, z = math.sqrt(ref_var), 0.0
        else:
            stderr = math.sqrt(scales[index] ** 2 / n + ref_var)
            z = effect / stderr
        flagged = (
            not (tail and config.skip_tail)
            and n >= config.min_samples
            and effect >= config.min_effect
            and z >= config.z_threshold
        )
        out.append(MinerEffect(hotkey, stage, n, effect, stderr, z, flagged))
    return out


def estimate_effects(
    records: Sequence[LossRecord], n_stages: int, config: ClaspConfig = ClaspConfig()
) -> list[MinerEffect]:
    """Each miner's additive effect on the loss at each stage it served, and whether CLASP flags it; see
    the module doc. Ordered by stage, then by first appearance in the log."""
    if n_stages < 1:
        raise ValueError("n_stages must be at least 1")
    log = _clean(records, n_stages)
    if len(log.losses) == 0:
        return []
    fit = _backfit(log, config)
    residuals = _clipped_partials(log.losses - fit.trend - _fitted(log, fit.effects), config.clip_scales)
    pooled = float(np.std(residuals, ddof=1)) if len(residuals) > 1 else 0.0
    return [effect for stage in range(n_stages) for effect in _stage_effects(log, fit, stage, pooled, config)]


def quality(effects: Sequence[MinerEffect]) -> dict[str, float]:
    """The CLASP factor of each hotkey in `effects`: 0.0 if flagged at any stage, else 1.0. Binary on
    purpose: a graded factor would pay a cheat in proportion to how little it was caught, and z is a
    measure of evidence, not of damage."""
    result: dict[str, float] = {}
    for e in effects:
        result[e.hotkey] = 0.0 if e.flagged or result.get(e.hotkey) == 0.0 else 1.0
    return result
