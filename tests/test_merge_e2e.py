"""Merging on the whole network (`iota devnet`: separate processes, real HTTP, real S3): replicas end
bitwise identical past a lying reducer and the checkpoint exports to a model that `iota sample` runs; a
miner killed mid-merge rejoins from the checkpoint. Each is its own network, about one thing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.merge import flatten
from common.protocol import MergeRecord
from iota.devnet import Devnet, DevnetOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def replicas_by_stage(net: Devnet) -> dict[int, list[torch.Tensor]]:
    """Stop every miner (each writes its stage's weights) and group the snapshots by stage."""
    out: dict[int, list[torch.Tensor]] = {}
    for stage, weights in net.snapshots().values():
        out.setdefault(stage, []).append(flatten(weights))
    return out


def iota(net: Devnet, *args: str) -> subprocess.CompletedProcess[str]:
    env = net.env()
    return subprocess.run(
        [sys.executable, "-m", "iota.cli", *args], env=env, cwd=net.workdir, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def two_per_stage(tmp_path: Path, samples: int, *, merge_every: int, **env: str) -> DevnetOptions:
    """Two replicas of every stage, small batches, snapshots of the weights when the miners stop."""
    return DevnetOptions(
        miners_per_stage=2, batch_size=4, seq_len=64, workdir=tmp_path, snapshots=True,
        merge_every=merge_every, extra_env={"IOTA_ORCH_MAX_SAMPLES": str(samples), **env},
    )  # fmt: skip


def check_records(records: list[MergeRecord], stage_of: dict[str, int]) -> None:
    """Every merge merged, with only the stage's replicas taking part; one may be left out (dead, or it
    trained nothing in an epoch cut short) and named, and a merge of one is still a merge."""
    for r in records:
        replicas = {hk for hk, st in stage_of.items() if st == r.stage}
        assert r.outcome == "merged" and r.participants, r
        assert set(r.participants) | set(r.excluded) <= replicas, r
        assert r.participants.keys().isdisjoint(r.excluded), r


def assert_replicas_identical(net: Devnet) -> dict[int, list[torch.Tensor]]:
    replicas = replicas_by_stage(net)
    for stage, weights in replicas.items():
        assert len(weights) == 2 and torch.equal(weights[0], weights[1]), f"stage {stage} replicas differ"
    return replicas


def test_replicas_merge_to_identical_weights_past_a_lying_reducer_and_the_checkpoint_exports(
    tmp_path: Path,
) -> None:
    """Two replicas per stage, one of them a reducer that lies: the lie is caught and settled in every merge
    the liar takes part in, nobody else is flagged, every stage's replicas end bitwise identical, and the
    checkpoint exports to exactly their weights and samples text."""
    # Epochs of 12 and what the drain finishes beyond; the last merges as soon as all the samples are done.
    samples = 30
    options = two_per_stage(tmp_path, samples, merge_every=12)
    with Devnet(options) as net:
        net.launch(["honest"] * 5 + ["wrong-reduce"], threads=1, timeout_s=90)
        stage_of = {m.hotkey: m.stage for m in net.status().miners}
        liar = next(hk for hk, b in net.behaviors.items() if b == "wrong-reduce")
        status = net.wait_for_last_merge(samples, timeout_s=240)
        records = net.merges()
        assert status.merges_completed >= 6 and status.merges_rolled_back == 0, records
        check_records(records, stage_of)
        # Where the liar reduced: every participant of a merge of two or more reduces two partitions; a merge
        # of which it is the only participant has nothing to reduce.
        lied = [r for r in records if liar in r.participants and len(r.participants) >= 2]
        assert lied and all(r.settled >= 1 for r in lied), lied
        assert all({f.hotkey for f in r.flagged} == {liar} for r in lied)  # flagged, and nobody else
        assert not any(r.flagged for r in records if r not in lied)

        export = tmp_path / "model.safetensors"
        done = iota(net, "export", "--out", str(export), "--run", status.run_id)
        assert done.returncode == 0, done.stdout + done.stderr
        exported = load_file(export)
        for stage, weights in assert_replicas_identical(net).items():
            prefix = f"stages.{stage}."
            mine = {k[len(prefix) :]: v for k, v in exported.items() if k.startswith(prefix)}
            assert torch.equal(flatten(mine), weights[0]), f"the export of stage {stage} is not the replicas'"

        done = iota(net, "sample", "--checkpoint", str(export), "--prompt", "def ", "--max-new-tokens", "40")
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(done.stdout.strip()) > 0


def test_a_miner_killed_during_a_merge_is_left_out_and_rejoins_from_the_checkpoint(tmp_path: Path) -> None:
    """A miner SIGKILLed as the first epoch stops training is left out of that merge (its partner merges
    alone), then restarts, loads the stage's checkpoint and takes part in a later merge; at the end its
    stage's replicas are bitwise identical."""
    # Epochs of 12 (more where a drain finishes extra), enough of them for the restarted miner to train in
    # one; the last epoch merges as soon as all the samples are done.
    samples = 48
    options = two_per_stage(
        tmp_path, samples, merge_every=12, IOTA_ORCH_MERGE_PHASE_TIMEOUT_S="4", IOTA_ORCH_MINER_TIMEOUT_S="6"
    )
    with Devnet(options) as net:
        net.launch(["honest"] * 6, threads=1, timeout_s=90)
        stage_of = {m.hotkey: m.stage for m in net.status().miners}
        victim = next(iter(net.hotkeys))
        victim_key, victim_stage = net.hotkeys[victim], stage_of[net.hotkeys[victim]]
        partner = next(hk for hk, st in stage_of.items() if st == victim_stage and hk != victim_key)
        # Kill it as soon as the first epoch stops training: it dies before or inside its stage's merge.
        net.wait_for(lambda s: s.epoch_phase != "training", timeout_s=120, poll_s=0.05)
        net.kill_miner(victim)
        net.restart_miner(victim)  # it takes seconds to start: the merge is over before it registers
        net.wait_for(lambda s: s.merges_completed + s.merges_rolled_back >= 3, timeout_s=60)
        first = {r.stage: r for r in net.merges() if r.epoch == 0}
        assert all(r.outcome == "merged" for r in first.values()), first
        assert first[victim_stage].in_sync == [partner]  # the merge completed without the dead miner

        status = net.wait_for_last_merge(samples, timeout_s=240)
        records = net.merges()
        assert status.merges_completed >= 6 and status.merges_rolled_back == 0, records
        check_records(records, stage_of)
        assert not any(r.flagged for r in records)
        # The restarted miner loaded the checkpoint and merged again with its partner.
        assert "loaded the checkpoint of stage" in (net.workdir / "logs" / f"{victim}.log").read_text()
        assert any(
            r.stage == victim_stage and sorted(r.in_sync) == sorted([victim_key, partner]) for r in records
        ), records
        assert_replicas_identical(net)
