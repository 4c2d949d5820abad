"""CLASP on synthetic loss logs: cheats flagged, honest miners and tails not, hostile records ignored."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from common.protocol import LossRecord
from validator.clasp import ClaspConfig, MinerEffect, estimate_effects, quality, running_median

N_STAGES = 3
# A route chooser: (rng, record index) -> the pathway's miner index at each stage.
Router = Callable[[np.random.Generator, int], list[int]]


def make_log(
    n: int,
    *,
    seed: int = 0,
    miners: int = 2,
    bias: dict[tuple[int, int], float] | None = None,
    noise: float = 0.5,
    trend_drop: float = 1.0,
    router: Router | None = None,
) -> list[LossRecord]:
    """n records over N_STAGES stages, `miners` per stage routed at random (or by `router`); loss = 4 +
    a linear downward trend + normal noise + bias[(stage, miner)] for each miner on the pathway. Hotkeys
    are `s{stage}m{miner}`."""
    rng = np.random.default_rng(seed)
    bias = bias or {}
    records = []
    for i in range(n):
        route = router(rng, i) if router else [int(m) for m in rng.integers(miners, size=N_STAGES)]
        loss = 4.0 + trend_drop * (1 - i / n) + rng.normal(0, noise)
        loss += sum(bias.get((s, m), 0.0) for s, m in enumerate(route))
        pathway = [f"s{s}m{m}" for s, m in enumerate(route)]
        records.append(LossRecord(seq=i, sample=i, attempt=0, loss=loss, at=1.7e9 + i, pathway=pathway))
    return records


def flagged(effects: list[MinerEffect]) -> set[str]:
    return {e.hotkey for e in effects if e.flagged}


def by_key(effects: list[MinerEffect]) -> dict[tuple[int, str], MinerEffect]:
    return {(e.stage, e.hotkey): e for e in effects}


@pytest.mark.parametrize("miners", [2, 3])
def test_bad_body_miner_is_flagged_and_its_peers_are_not(miners: int) -> None:
    effects = estimate_effects(make_log(600, miners=miners, bias={(1, 0): 0.5}), N_STAGES)
    assert flagged(effects) == {"s1m0"}
    bad = by_key(effects)[(1, "s1m0")]
    assert bad.effect == pytest.approx(0.5, abs=0.15)
    assert bad.z >= 4


def test_all_honest_logs_flag_nobody() -> None:
    for seed in range(40):
        assert flagged(estimate_effects(make_log(400, seed=seed, miners=2 + seed % 3), N_STAGES)) == set()


def test_tail_miner_is_estimated_but_not_flagged_unless_asked() -> None:
    records = make_log(600, bias={(2, 1): 0.8})
    tail = by_key(estimate_effects(records, N_STAGES))[(2, "s2m1")]
    assert tail.effect == pytest.approx(0.8, abs=0.15) and not tail.flagged
    assert flagged(estimate_effects(records, N_STAGES, ClaspConfig(skip_tail=False))) == {"s2m1"}


def test_a_miner_with_too_few_samples_is_never_flagged() -> None:
    # s1m2 serves only 6 samples, each 3 nats worse: an enormous z, but below min_samples.
    def router(rng: np.random.Generator, i: int) -> list[int]:
        return [int(rng.integers(2)), 2 if i % 100 == 0 else int(rng.integers(2)), int(rng.integers(2))]

    records = make_log(600, router=router, bias={(1, 2): 3.0})
    rare = by_key(estimate_effects(records, N_STAGES))[(1, "s1m2")]
    assert rare.samples == 6 and rare.effect > 2 and not rare.flagged
    rare = by_key(estimate_effects(records, N_STAGES, ClaspConfig(min_samples=5)))[(1, "s1m2")]
    assert rare.flagged


def test_bad_records_are_ignored_without_raising() -> None:
    good = make_log(400, bias={(1, 0): 0.5})
    hostile = [
        LossRecord.model_construct(
            seq=10_000, sample=1, attempt=0, loss=math.nan, at=0.0, pathway=["a", "b", "c"]
        ),
        LossRecord.model_construct(
            seq=10_001, sample=1, attempt=0, loss=math.inf, at=0.0, pathway=["a", "b", "c"]
        ),
        LossRecord.model_construct(
            seq=10_002, sample=1, attempt=0, loss=-1.0, at=0.0, pathway=["a", "b", "c"]
        ),
        LossRecord.model_construct(
            seq=10_003, sample=1, attempt=0, loss=1e9, at=0.0, pathway=["a", "b", "c"]
        ),
        LossRecord.model_construct(seq=10_004, sample=1, attempt=0, loss=3.0, at=0.0, pathway=["a", "b"]),
        LossRecord.model_construct(
            seq=10_005, sample=1, attempt=0, loss="3", at=0.0, pathway=["a", "b", "c"]
        ),
        LossRecord.model_construct(seq=None, sample=1, attempt=0, loss=3.0, at=0.0, pathway=["a", "b", "c"]),
        LossRecord.model_construct(seq=10_006, sample=1, attempt=0, loss=3.0, at=0.0, pathway=None),
        LossRecord.model_construct(seq=10_007, sample=1, attempt=0, loss=3.0, at=0.0, pathway=["a", 5, "c"]),
    ]
    effects = estimate_effects(hostile + good, N_STAGES)
    assert effects == estimate_effects(good, N_STAGES)
    assert flagged(effects) == {"s1m0"}
    assert estimate_effects(hostile, N_STAGES) == []
    assert estimate_effects([], N_STAGES) == []


def test_order_is_by_seq_not_by_position() -> None:
    records = make_log(400, bias={(1, 0): 0.5})
    assert estimate_effects(records[::-1], N_STAGES) == estimate_effects(records, N_STAGES)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError):
        estimate_effects(make_log(10), 0)
    for bad in (
        {"detrend_window": 2},
        {"z_threshold": 0.0},
        {"z_threshold": math.nan},
        {"min_effect": -0.1},
        {"min_samples": 0},
        {"iterations": 0},
        {"clip_scales": 0.0},
    ):
        with pytest.raises(ValueError):
            ClaspConfig(**bad)  # type: ignore[arg-type]


def test_one_miner_per_stage_is_not_identifiable_so_never_flagged() -> None:
    # Every sample goes through s1m0, which adds 2 nats: there is no peer to compare it with.
    records = make_log(400, miners=1, bias={(1, 0): 2.0})
    effects = estimate_effects(records, N_STAGES)
    assert len(effects) == N_STAGES
    assert all(e.effect == 0.0 and e.z == 0.0 and not e.flagged for e in effects)


def test_a_miner_on_two_stages_is_scored_at_each() -> None:
    # Hotkey "both" serves stage 0 (honestly) and stage 1 (badly).
    def rename(records: list[LossRecord]) -> list[LossRecord]:
        swap = {"s0m0": "both", "s1m0": "both"}
        return [r.model_copy(update={"pathway": [swap.get(h, h) for h in r.pathway]}) for r in records]

    effects = estimate_effects(rename(make_log(800, bias={(1, 0): 0.5})), N_STAGES)
    keyed = by_key(effects)
    assert not keyed[(0, "both")].flagged and keyed[(1, "both")].flagged
    assert quality(effects)["both"] == 0.0


def test_quality_is_zero_when_flagged_anywhere_and_one_otherwise() -> None:
    def effect(hotkey: str, stage: int, is_flagged: bool) -> MinerEffect:
        return MinerEffect(hotkey, stage, 100, 0.0, 0.1, 0.0, is_flagged)

    effects = [effect("a", 0, False), effect("b", 0, True), effect("c", 1, True), effect("c", 0, False)]
    assert quality(effects) == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert quality([]) == {}


def test_additive_effects_are_recovered() -> None:
    truth = {(0, 1): 0.3, (0, 2): -0.2, (1, 1): 0.6, (1, 2): 0.1, (2, 1): -0.4, (2, 2): 0.25}
    effects = estimate_effects(make_log(6000, miners=3, bias=truth, noise=0.3), N_STAGES)
    for e in effects:
        stage, miner = e.stage, int(e.hotkey.rsplit("m", 1)[1])
        # Effects are relative to the stage's reference: the lower median, here miner 0 (truth 0) or the
        # stage's middle miner; compare differences to the reference, whichever it is.
        reference = next(r for r in effects if r.stage == stage and r.z == 0.0 and r.effect == 0.0)
        ref_truth = truth.get((stage, int(reference.hotkey.rsplit("m", 1)[1])), 0.0)
        assert e.effect == pytest.approx(truth.get((stage, miner), 0.0) - ref_truth, abs=0.05)


def test_two_miners_the_honest_one_is_the_reference() -> None:
    # With the plain median of two, each would sit at +-0.25; the lower one as reference gives 0 and +0.5.
    keyed = by_key(estimate_effects(make_log(800, bias={(1, 0): 0.5}), N_STAGES))
    assert keyed[(1, "s1m1")].effect == 0.0
    assert keyed[(1, "s1m0")].effect == pytest.approx(0.5, abs=0.12)


def test_sparse_corruption_moves_the_mean() -> None:
    # s1m0 ruins 20% of its samples by 2 nats (random outputs cost about that): about +0.4 on average.
    rng = np.random.default_rng(5)
    records = make_log(1500)
    worse = [
        r.model_copy(update={"loss": r.loss + 2.0}) if r.pathway[1] == "s1m0" and rng.random() < 0.2 else r
        for r in records
    ]
    bad = by_key(estimate_effects(worse, N_STAGES))[(1, "s1m0")]
    assert bad.flagged and bad.effect == pytest.approx(0.4, abs=0.12)


@pytest.mark.parametrize("late", [True, False])
def test_trend_with_a_miner_joining_late_or_leaving_early_flags_nobody(late: bool) -> None:
    # The loss falls by 3 nats over the log. s1m2 serves only the last (or the first) third, when every
    # loss is low (or high): its raw mean is far from its peers', but the detrended residuals are not.
    n = 1500

    def router(rng: np.random.Generator, i: int) -> list[int]:
        present = i >= 2 * n // 3 if late else i < n // 3
        return [int(rng.integers(2)), int(rng.integers(3 if present else 2)), int(rng.integers(2))]

    for seed in range(5):
        records = make_log(n, seed=seed, router=router, trend_drop=3.0)
        effects = estimate_effects(records, N_STAGES)
        assert flagged(effects) == set(), [e for e in effects if e.flagged]
        assert abs(by_key(effects)[(1, "s1m2")].effect) < 0.15
        # Without detrending (a window as long as the log) the newcomer stands out: the test has teeth.
        undetrended = by_key(estimate_effects(records, N_STAGES, ClaspConfig(detrend_window=n)))
        assert abs(undetrended[(1, "s1m2")].effect) > 1.0


def test_late_cheat_is_still_caught_under_a_trend() -> None:
    n = 1500

    def router(rng: np.random.Generator, i: int) -> list[int]:
        return [int(rng.integers(2)), int(rng.integers(3 if i >= n // 2 else 2)), int(rng.integers(2))]

    records = make_log(n, router=router, trend_drop=3.0, bias={(1, 2): 0.5})
    assert flagged(estimate_effects(records, N_STAGES)) == {"s1m2"}


def test_running_median_is_centered_and_keeps_its_window_inside_the_series() -> None:
    line = np.arange(100, dtype=float)
    trend = running_median(line, 9)
    assert np.allclose(trend[4:96], line[4:96])  # a centered median has no lag on a straight line
    assert np.allclose(trend[:4], 4.0) and np.allclose(trend[96:], 95.0)
    assert np.allclose(running_median(line[:5], 9), 2.0)
    assert len(running_median(np.array([]), 9)) == 0
