"""Merging on the whole network (`iota devnet`: separate processes, real HTTP, real S3): replicas end
bitwise identical, a miner killed mid-merge rejoins from the checkpoint, and the checkpoint exports to a
model that `iota sample` runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.merge import flatten
from common.protocol import RunStatus
from iota.devnet import Devnet, DevnetOptions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def merged_after_training(status: RunStatus, samples: int, merges: int) -> bool:
    """Every sample trained, `merges` stage merges done, and training resumed (no merge running)."""
    return (
        status.samples_completed >= samples
        and status.merges_completed >= merges
        and status.epoch_phase == "training"
    )


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


def test_replicas_merge_to_identical_weights_past_a_lying_reducer_and_the_checkpoint_exports(
    tmp_path: Path,
) -> None:
    """One network run (two replicas per stage, one of them a reducer that lies) checks that the lie is caught
    and settled, the replicas still end bitwise identical, and the checkpoint exports to exactly their weights
    and samples text. A merge of honest replicas only, with no flag, is checked by the mid-merge kill test."""
    samples = 20
    # The last epoch may be short of 10 samples (the first one's drain can finish more than 10): it ends once
    # the run's 20 samples are done, so the run ends right after a merge.
    options = two_per_stage(tmp_path, samples, merge_every=10)
    with Devnet(options) as net:
        net.launch(["honest"] * 5 + ["wrong-reduce"], threads=1, timeout_s=90)
        status = net.wait_for(lambda s: merged_after_training(s, samples, 6), timeout_s=180)
        records = net.merges()
        assert status.merges_rolled_back == 0 and len(records) >= 6
        stage_of = {m.hotkey: m.stage for m in status.miners}
        for r in records:
            # Both replicas take part, or the record says why one did not: an epoch cut short by time can
            # leave a replica without a step, and a merge of one is still a merge.
            replicas = {hk for hk, st in stage_of.items() if st == r.stage}
            assert r.outcome == "merged" and r.participants, r
            assert set(r.participants) | set(r.excluded) == replicas and r.participants.keys().isdisjoint(
                r.excluded
            )
        for stage in stage_of.values():
            assert any(len(r.participants) == 2 for r in records if r.stage == stage), records
        liar = next(hk for hk, b in net.behaviors.items() if b == "wrong-reduce")
        lied = [r for r in records if liar in r.participants]
        assert lied and all(r.settled >= 1 for r in lied)
        assert all({f.hotkey for f in r.flagged} == {liar} for r in lied)  # flagged, and nobody else
        assert not any(r.flagged for r in records if liar not in r.participants)

        export = tmp_path / "model.safetensors"
        done = iota(net, "export", "--out", str(export), "--run", status.run_id)
        assert done.returncode == 0, done.stdout + done.stderr
        exported = load_file(export)

        replicas = replicas_by_stage(net)
        for stage, weights in replicas.items():
            assert len(weights) == 2 and torch.equal(weights[0], weights[1]), f"stage {stage} replicas differ"
            prefix = f"stages.{stage}."
            mine = {k[len(prefix) :]: v for k, v in exported.items() if k.startswith(prefix)}
            assert torch.equal(flatten(mine), weights[0]), f"the export of stage {stage} is not the replicas'"

        done = iota(net, "sample", "--checkpoint", str(export), "--prompt", "def ", "--max-new-tokens", "40")
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(done.stdout.strip()) > 0


def test_a_miner_killed_during_a_merge_is_left_out_and_rejoins_from_the_checkpoint(tmp_path: Path) -> None:
    options = DevnetOptions(
        miners_per_stage=2,
        batch_size=4,
        seq_len=64,
        workdir=tmp_path,
        merge_every=12,
        extra_env={
            "IOTA_ORCH_MAX_SAMPLES": "400",  # a bound; the test ends long before
            "IOTA_ORCH_MERGE_PHASE_TIMEOUT_S": "4",
            "IOTA_ORCH_MINER_TIMEOUT_S": "6",
        },
    )
    with Devnet(options) as net:
        net.launch(["honest"] * 6, threads=1, timeout_s=90)
        stage_of = {m.hotkey: m.stage for m in net.status().miners}
        victim = next(name for name, hk in net.hotkeys.items() if stage_of[hk] == 1)
        victim_key = net.hotkeys[victim]
        partner = next(hk for hk, st in stage_of.items() if st == 1 and hk != victim_key)
        # Kill it as soon as the first epoch stops training: it dies before or inside stage 1's merge.
        net.wait_for(lambda s: s.epoch_phase != "training", timeout_s=120, poll_s=0.05)
        net.kill_miner(victim)
        net.wait_for(lambda s: s.merges_completed + s.merges_rolled_back >= 3, timeout_s=60)
        first = {r.stage: r for r in net.merges() if r.epoch == 0}
        assert all(r.outcome == "merged" for r in first.values())
        assert first[1].in_sync == [partner]  # the merge completed without the dead miner

        net.restart_miner(victim)
        # It registers again, loads the stage's checkpoint, trains, and takes part in a later merge, after
        # which both replicas report the same weights (the checkpoint's digest).
        net.wait_for(
            lambda s: any(
                r.stage == 1 and sorted(r.in_sync) == sorted([victim_key, partner]) for r in net.merges()
            ),
            timeout_s=200,
        )
        assert "loaded the checkpoint of stage 1" in (net.workdir / "logs" / f"{victim}.log").read_text()
        assert net.status().merges_rolled_back == 0
        assert not any(r.flagged for r in net.merges())
