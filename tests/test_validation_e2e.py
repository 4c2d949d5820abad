"""Validation on the whole network (`iota devnet`: separate processes, real HTTP, real S3, a local chain):
a validator replays every miner's epochs, scores them and sets weights; every kind of cheat ends with
almost nothing, honest miners are never failed, and the owner gets exactly the burn."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from iota.devnet import DevnetOptions, run_devnet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ADVERSARIES = ["random-output", "zero-grad", "scaled-output", "copy-input", "wrong-loss"]
BURN = 0.1


def test_cheaters_end_below_five_percent_of_honest_weight_and_honest_miners_are_never_failed(
    tmp_path: Path,
) -> None:
    options = DevnetOptions(
        miners_per_stage=1,
        batch_size=4,
        seq_len=64,
        # A sample count, not a time: the run ends when 48 samples are done, whatever the machine's speed,
        # and since training pauses while an epoch merges, by then epochs 0 and 1 have merged every stage.
        duration_s=None,
        samples=48,
        merge_every=16,
        workdir=tmp_path,
        behaviors=ADVERSARIES,
        validators=1,
        validation_fraction=1.0,  # every epoch of every miner is replayed
        burn_fraction=BURN,
        weights_interval_s=3.0,
    )
    summary = run_devnet(options)
    validation, weights, behaviors = summary["validation"], summary["weights"], summary["behaviors"]
    assert validation["finished"], validation
    assert summary["merges_completed"] >= 6 and summary["merges_rolled_back"] == 0, summary

    # Honest miners: never failed by a replay, never penalized, and paid.
    honest = [h for h, b in behaviors.items() if b == "honest"]
    assert validation["false_positives"] == 0, validation
    assert validation["honest_penalized"] == [], validation
    assert all(weights.get(h, 0.0) > 0 for h in honest), weights
    mean_honest = statistics.fmean(weights.get(h, 0.0) for h in honest)

    # Every cheat: caught by a replay and paid less than 5% of the mean honest miner.
    for hotkey, behavior in behaviors.items():
        if behavior == "honest":
            continue
        assert hotkey in validation["replays_failed"], (behavior, validation)
        assert weights.get(hotkey, 0.0) < 0.05 * mean_honest, (behavior, weights.get(hotkey), mean_honest)

    # The owner's uid 0 gets exactly the burn; the weights are a distribution.
    assert weights[summary["owner"]] == pytest.approx(BURN, abs=1e-6)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-6)
