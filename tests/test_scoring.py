"""Miner scores and chain weights (validator/scoring.py): the documented formula, penalties, the burn."""

from __future__ import annotations

import math
import random

import pytest

from common.chain.base import Metagraph, Neuron
from common.protocol import EpochLedger, MinerEpochWork, ReplayVerdict, VerdictRecord
from validator.scoring import (
    MinerScore,
    ScoringConfig,
    replay_failed,
    score_miners,
    weights_from_scores,
)

OWNER, A, B, C = "owner", "miner-a", "miner-b", "miner-c"
V_HIGH, V_LOW = "validator-high", "validator-low"


def neuron(uid: int, hotkey: str, stake: float = 0.0, permit: bool = False) -> Neuron:
    return Neuron(uid=uid, hotkey=hotkey, coldkey=f"cold-{hotkey}", stake=stake, validator_permit=permit)


def metagraph(*neurons: Neuron) -> Metagraph:
    return Metagraph(netuid=9, block=1, neurons=list(neurons))


# uid 0 is the subnet owner (the burn uid), 1..3 miners, 4..5 validators.
MG = metagraph(
    neuron(0, OWNER),
    neuron(1, A),
    neuron(2, B),
    neuron(3, C),
    neuron(4, V_HIGH, stake=1000.0, permit=True),
    neuron(5, V_LOW, stake=10.0, permit=True),
)


def work(hotkey: str, items: int, partitions: int = 0, flags: list[str] | None = None) -> MinerEpochWork:
    return MinerEpochWork(
        hotkey=hotkey, stage=0, items=items, partitions=partitions, merged=True, flags=flags or []
    )


def verdict(
    miner: str, epoch: int, validator: str, passed: bool, task: str = "", at: float = 0.0
) -> VerdictRecord:
    return VerdictRecord(
        task_id=task or f"task-{miner}-{epoch}",
        validator=validator,
        miner=miner,
        epoch=epoch,
        stage=0,
        verdict=ReplayVerdict(passed=passed, ops=3, checks=5, failure=None if passed else "forward mismatch"),
        at=at,
    )


def ledger(
    epoch: int, miners: list[MinerEpochWork], verdicts: list[VerdictRecord] | None = None
) -> EpochLedger:
    return EpochLedger(epoch=epoch, finished_at=float(epoch), miners=miners, verdicts=verdicts or [])


def steady(epochs: range, *extra: tuple[int, VerdictRecord]) -> list[EpochLedger]:
    """A and B each do 10 items every epoch; `extra` adds (ledger epoch, verdict) pairs."""
    return [ledger(e, [work(A, 10), work(B, 10)], [v for at, v in extra if at == e]) for e in epochs]


def check_weights(weights: dict[int, float]) -> None:
    assert weights
    assert all(isinstance(uid, int) and uid >= 0 for uid in weights)
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    assert math.fsum(weights.values()) == pytest.approx(1.0, abs=1e-12)


# --- the formula, by hand ------------------------------------------------------------------------------


HAND_CONFIG = ScoringConfig(window_epochs=8, decay=0.5, partition_weight=2.0, burn_fraction=0.2, burn_uid=0)
HAND_LEDGERS = [
    ledger(1, [work(A, 10, 1), work(B, 4)]),
    ledger(2, [work(A, 6), work(C, 8, 2)]),
    ledger(3, [work(A, 2, 1), work(B, 10), work(C, 0)]),
]
HAND_QUALITY = {A: 0.5, C: 0.75}  # B has no CLASP entry: 1.0


def test_scores_match_the_documented_formula_by_hand() -> None:
    scores = score_miners(HAND_LEDGERS, HAND_QUALITY, MG, HAND_CONFIG)

    # E = 3, weights 0.25, 0.5, 1 for epochs 1, 2, 3; work = items + 2 * partitions.
    # A: 0.25*(10+2) + 0.5*6 + 1*(2+2) = 3 + 3 + 4 = 10, times q 0.5 = 5
    # B: 0.25*4 + 1*10 = 11, times q 1.0 (default) = 11
    # C: 0.5*(8+4) + 1*0 = 6, times q 0.75 = 4.5
    assert set(scores) == {A, B, C}
    assert scores[A] == MinerScore(A, pytest.approx(10.0), 0.5, False, [], pytest.approx(5.0))
    assert scores[B] == MinerScore(B, pytest.approx(11.0), 1.0, False, [], pytest.approx(11.0))
    assert scores[C] == MinerScore(C, pytest.approx(6.0), 0.75, False, [], pytest.approx(4.5))


def test_weights_give_the_burn_uid_exactly_its_share_and_the_rest_proportionally() -> None:
    scores = score_miners(HAND_LEDGERS, HAND_QUALITY, MG, HAND_CONFIG)
    weights = weights_from_scores(scores, MG, HAND_CONFIG)

    total = 5.0 + 11.0 + 4.5
    assert weights == pytest.approx({0: 0.2, 1: 0.8 * 5 / total, 2: 0.8 * 11 / total, 3: 0.8 * 4.5 / total})
    check_weights(weights)


def test_a_burn_uid_that_is_also_a_miner_gets_both_shares() -> None:
    config = ScoringConfig(decay=0.5, partition_weight=2.0, burn_fraction=0.2, burn_uid=2)  # B's uid
    weights = weights_from_scores(score_miners(HAND_LEDGERS, HAND_QUALITY, MG, config), MG, config)

    total = 5.0 + 11.0 + 4.5
    assert weights == pytest.approx({1: 0.8 * 5 / total, 2: 0.2 + 0.8 * 11 / total, 3: 0.8 * 4.5 / total})
    check_weights(weights)


def test_no_burn_leaves_the_burn_uid_out() -> None:
    config = ScoringConfig(decay=0.5, partition_weight=2.0)
    weights = weights_from_scores(score_miners(HAND_LEDGERS, HAND_QUALITY, MG, config), MG, config)
    assert set(weights) == {1, 2, 3}
    check_weights(weights)


def test_full_burn_gives_everything_to_the_burn_uid() -> None:
    config = ScoringConfig(burn_fraction=1.0)
    assert weights_from_scores(score_miners(HAND_LEDGERS, {}, MG, config), MG, config) == {0: 1.0}


def test_ledgers_older_than_the_window_are_ignored() -> None:
    config = ScoringConfig(window_epochs=2, decay=0.5, partition_weight=2.0)
    scores = score_miners(HAND_LEDGERS, {}, MG, config)  # epochs 2 and 3 only

    assert scores[A].work == pytest.approx(0.5 * 6 + 4)
    assert scores[B].work == pytest.approx(10.0)
    assert scores[C].work == pytest.approx(6.0)


def test_decay_one_sums_the_window_evenly() -> None:
    config = ScoringConfig(decay=1.0, partition_weight=0.0)
    scores = score_miners(HAND_LEDGERS, {}, MG, config)
    assert scores[A].score == pytest.approx(18.0)


# --- everything to the burn uid when nobody earned anything -----------------------------------------


def test_all_zero_scores_give_everything_to_the_burn_uid() -> None:
    config = ScoringConfig(burn_fraction=0.1, burn_uid=0)
    idle = [ledger(1, [work(A, 0), work(B, 0)])]
    scores = score_miners(idle, {}, MG, config)

    assert all(s.work == 0 and s.score == 0 and not s.penalized for s in scores.values())
    assert weights_from_scores(scores, MG, config) == {0: 1.0}
    assert weights_from_scores({}, MG, config) == {0: 1.0}
    assert score_miners([], {}, MG, config) == {}


def test_zero_quality_scores_zero() -> None:
    config = ScoringConfig()
    scores = score_miners(HAND_LEDGERS, {A: 0.0, B: 0.0, C: 0.0}, MG, config)
    assert all(s.score == 0 and not s.penalized for s in scores.values())
    assert weights_from_scores(scores, MG, config) == {0: 1.0}


# --- penalties ---------------------------------------------------------------------------------------------


def test_a_failed_replay_zeroes_the_miner_until_its_epoch_leaves_the_window() -> None:
    config = ScoringConfig(window_epochs=3, decay=1.0)
    # The verdict about epoch 1 is published with the ledger of epoch 2 (replays finish later).
    failed = (2, verdict(A, 1, V_HIGH, passed=False))

    for last in (2, 3):  # epoch 1 is inside the window
        scores = score_miners(steady(range(1, last + 1), failed), {}, MG, config)
        assert scores[A].penalized and scores[A].score == 0
        assert scores[A].work == pytest.approx(10.0 * last)  # the work is still reported
        assert scores[A].reasons == [f"failed replay in epoch 1 by validator {V_HIGH}: forward mismatch"]
        assert scores[B].score == pytest.approx(10.0 * last)
        assert weights_from_scores(scores, MG, config) == {2: 1.0}

    scores = score_miners(steady(range(1, 5), failed), {}, MG, config)  # window 2..4
    assert not scores[A].penalized and scores[A].reasons == []
    assert scores[A].score == pytest.approx(30.0)
    assert weights_from_scores(scores, MG, config) == pytest.approx({1: 0.5, 2: 0.5})


def test_a_passed_replay_does_not_penalize() -> None:
    scores = score_miners(
        steady(range(1, 3), (2, verdict(A, 1, V_HIGH, passed=True))), {}, MG, ScoringConfig()
    )
    assert not scores[A].penalized and scores[A].score > 0


def test_a_merge_flag_zeroes_the_miner_for_the_window() -> None:
    config = ScoringConfig(window_epochs=2, decay=1.0)
    ledgers = [
        ledger(1, [work(A, 10, 1, flags=["wrong partition"]), work(B, 10)]),
        ledger(2, [work(A, 10), work(B, 10)]),
    ]
    scores = score_miners(ledgers, {}, MG, config)
    assert scores[A].penalized and scores[A].score == 0
    assert scores[A].reasons == ["merge flag in epoch 1: wrong partition"]
    assert weights_from_scores(scores, MG, config) == {2: 1.0}

    scores = score_miners([*ledgers, ledger(3, [work(A, 10), work(B, 10)])], {}, MG, config)
    assert not scores[A].penalized and scores[A].score == pytest.approx(20.0)


def test_a_miner_named_only_by_a_failed_verdict_is_listed_as_penalized() -> None:
    scores = score_miners(
        steady(range(1, 3), (2, verdict(C, 2, V_HIGH, passed=False))), {}, MG, ScoringConfig()
    )
    assert scores[C].penalized and scores[C].work == 0 and scores[C].score == 0


# --- several validators: stake decides --------------------------------------------------------------------


def test_stake_decides_between_disagreeing_validators() -> None:
    config = ScoringConfig()
    high_pass = [(2, verdict(A, 1, V_HIGH, passed=True)), (2, verdict(A, 1, V_LOW, passed=False))]
    scores = score_miners(steady(range(1, 3), *high_pass), {}, MG, config)
    assert not scores[A].penalized and scores[A].score > 0

    high_fail = [(2, verdict(A, 1, V_HIGH, passed=False)), (2, verdict(A, 1, V_LOW, passed=True))]
    scores = score_miners(steady(range(1, 3), *high_fail), {}, MG, config)
    assert scores[A].penalized and scores[A].score == 0
    assert scores[A].reasons == [f"failed replay in epoch 1 by validator {V_HIGH}: forward mismatch"]


STAKES = {V_HIGH: 1000.0, V_LOW: 10.0, "v-mid": 500.0, "v-zero": 0.0}


def test_replay_failed_one_verdict_decides() -> None:
    assert replay_failed([verdict(A, 1, V_LOW, passed=False)], STAKES)
    assert not replay_failed([verdict(A, 1, V_LOW, passed=True)], STAKES)
    assert replay_failed([verdict(A, 1, "unknown", passed=False)], STAKES)  # stake 0 alone: majority of one
    assert not replay_failed([], STAKES)


def test_replay_failed_needs_more_than_half_the_stake() -> None:
    half = {"v1": 5.0, "v2": 5.0}
    tie = [verdict(A, 1, "v1", passed=False), verdict(A, 1, "v2", passed=True)]
    assert not replay_failed(tie, half)

    # 1000 failing vs 500 + 10 passing: fails; 500 + 10 failing vs 1000 passing: passes.
    group = [verdict(A, 1, V_HIGH, False), verdict(A, 1, "v-mid", True), verdict(A, 1, V_LOW, True)]
    assert replay_failed(group, STAKES)
    group = [verdict(A, 1, V_HIGH, True), verdict(A, 1, "v-mid", False), verdict(A, 1, V_LOW, False)]
    assert not replay_failed(group, STAKES)


def test_replay_failed_gives_unknown_and_zero_stake_no_weight() -> None:
    group = [verdict(A, 1, V_LOW, True), verdict(A, 1, "v-zero", False), verdict(A, 1, "unknown", False)]
    assert not replay_failed(group, STAKES)


def test_replay_failed_falls_back_to_a_plain_majority_without_stake() -> None:
    two_fail = [verdict(A, 1, "x", False), verdict(A, 1, "y", False), verdict(A, 1, "z", True)]
    assert replay_failed(two_fail, {})
    one_fail = [verdict(A, 1, "x", False), verdict(A, 1, "y", True), verdict(A, 1, "z", True)]
    assert not replay_failed(one_fail, {"x": 0.0})


def test_replay_failed_counts_each_validator_once_with_its_latest_verdict() -> None:
    stakes = {"v1": 10.0, "v2": 15.0}
    # v1 failed two tasks about the same (miner, epoch); it still weighs 10 against v2's 15.
    group = [
        verdict(A, 1, "v1", False, task="t1", at=1.0),
        verdict(A, 1, "v1", False, task="t2", at=2.0),
        verdict(A, 1, "v2", True, task="t1", at=1.5),
    ]
    assert not replay_failed(group, stakes)
    # A validator that passed and later failed: its latest verdict (the fail) counts.
    flip = [verdict(A, 1, "v1", True, task="t1", at=1.0), verdict(A, 1, "v1", False, task="t2", at=2.0)]
    assert replay_failed(flip, stakes)


# --- registration -----------------------------------------------------------------------------------


def test_unregistered_miners_get_nothing() -> None:
    config = ScoringConfig(burn_fraction=0.25)
    ledgers = [ledger(1, [work(A, 10), work("stranger", 1000)])]
    scores = score_miners(ledgers, {}, MG, config)

    assert scores["stranger"].score == 0 and scores["stranger"].reasons == ["not registered"]
    assert not scores["stranger"].penalized
    assert weights_from_scores(scores, MG, config) == pytest.approx({0: 0.25, 1: 0.75})

    # A score computed against an older metagraph pays nobody who has since deregistered.
    stale = {"stranger": MinerScore("stranger", 1.0, 1.0, False, [], 1.0)}
    assert weights_from_scores(stale, MG, config) == {0: 1.0}


def test_a_burn_uid_missing_from_the_metagraph_is_refused() -> None:
    config = ScoringConfig(burn_uid=42)
    with pytest.raises(ValueError, match="burn uid 42"):
        weights_from_scores({}, MG, config)


# --- weights are always a valid vector ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_weights_sum_to_one_and_are_finite_and_non_negative(seed: int) -> None:
    rng = random.Random(seed)
    hotkeys = [f"m{i}" for i in range(12)]
    mg = metagraph(
        *(neuron(i, h) for i, h in enumerate(hotkeys[:10])),  # m10, m11 unregistered
        neuron(10, "v1", 100.0, True),
        neuron(11, "v2", 50.0, True),
    )
    ledgers = []
    for e in range(rng.randint(1, 12)):
        miners = [
            work(h, rng.randint(0, 500), rng.randint(0, 3), ["flag"] if rng.random() < 0.05 else [])
            for h in rng.sample(hotkeys, rng.randint(0, len(hotkeys)))
        ]
        verdicts = [
            verdict(rng.choice(hotkeys), e, rng.choice(["v1", "v2"]), rng.random() > 0.1, task=f"t{e}-{i}")
            for i in range(rng.randint(0, 4))
        ]
        ledgers.append(ledger(e, miners, verdicts))
    config = ScoringConfig(
        window_epochs=rng.randint(1, 10),
        decay=rng.uniform(0.1, 1.0),
        partition_weight=rng.uniform(0, 50),
        burn_fraction=rng.choice([0.0, 1.0, rng.random()]),
        burn_uid=rng.randint(0, 11),
    )
    quality = {h: rng.random() for h in hotkeys if rng.random() < 0.7}

    scores = score_miners(ledgers, quality, mg, config)
    assert all(math.isfinite(s.score) and s.score >= 0 for s in scores.values())
    weights = weights_from_scores(scores, mg, config)
    check_weights(weights)
    assert set(weights) <= set(mg.uids)
    if config.burn_fraction > 0:
        assert weights[config.burn_uid] >= config.burn_fraction - 1e-12


# --- invalid inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"burn_fraction": -0.1}, "burn_fraction"),
        ({"burn_fraction": 1.5}, "burn_fraction"),
        ({"burn_fraction": math.nan}, "burn_fraction"),
        ({"decay": 0.0}, "decay"),
        ({"decay": 1.2}, "decay"),
        ({"decay": -0.5}, "decay"),
        ({"window_epochs": 0}, "window_epochs"),
        ({"window_epochs": 2.5}, "window_epochs"),
        ({"partition_weight": -1.0}, "partition_weight"),
        ({"burn_uid": -1}, "burn_uid"),
    ],
)
def test_invalid_config_raises(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScoringConfig(**kwargs)


def test_two_ledgers_for_one_epoch_are_refused() -> None:
    with pytest.raises(ValueError, match="more than one ledger"):
        score_miners([ledger(1, [work(A, 1)]), ledger(1, [work(A, 1)])], {}, MG, ScoringConfig())


def test_quality_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="quality"):
        score_miners(HAND_LEDGERS, {A: 1.5}, MG, ScoringConfig())


def test_negative_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="score"):
        weights_from_scores({A: MinerScore(A, 1.0, 1.0, False, [], -1.0)}, MG, ScoringConfig())
