"""The whole network on loopback, as `iota devnet` runs it: separate processes, real HTTP, real S3.

These are the slow tests: each starts an orchestrator and miner processes and trains the tiny preset.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import DataSettings
from common.data import SampleSchedule, batch_tokens, make_corpus
from common.model import IotaModel, get_preset, next_token_loss
from iota.devnet import Devnet, DevnetOptions
from orchestrator.db import StateDB
from orchestrator.settings import OrchestratorSettings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def start(options: DevnetOptions, miners: int) -> Devnet:
    net = Devnet(options).__enter__()
    try:
        net.launch(["honest"] * miners, threads=1, timeout_s=90)
    except BaseException:
        net.stop()
        raise
    return net


def events(net: Devnet, kind: str) -> list[dict[str, object]]:
    db = StateDB(net.workdir / "orchestrator.sqlite")  # WAL: reading beside the live orchestrator is safe
    try:
        return db.events(kind)
    finally:
        db.close()


def test_pipeline_over_the_network_equals_single_process_training(tmp_path: Path) -> None:
    """One miner per stage, one sample in flight at a time: after K samples every stage's weights equal
    those of the whole model trained in one process on the same samples in the same order."""
    k, b, t = 4, 2, 32
    options = DevnetOptions(
        batch_size=b,
        seq_len=t,
        workdir=tmp_path,
        snapshots=True,
        merge_every=0,  # merging would change the weights; here the pipeline alone is compared
        extra_env={"IOTA_ORCH_MAX_OUTSTANDING": "1", "IOTA_ORCH_MAX_SAMPLES": str(k)},
    )
    net = start(options, miners=3)
    try:
        net.wait_for(lambda s: s.samples_completed == k, timeout_s=120, poll_s=0.2)
        stage_of = {m.hotkey: m.stage for m in net.status().miners}
        for name in list(net.miners):
            net.stop_miner(name)
        snapshots = {stage_of[net.hotkeys[name]]: load_file(net.snapshot_path(name)) for name in net.miners}
    finally:
        net.stop()

    defaults = OrchestratorSettings(_env_file=None)
    cfg = get_preset("tiny")
    corpus = make_corpus(DataSettings(_env_file=None))
    schedule = SampleSchedule(corpus, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each miner: the same kernels in the same order, so the same bits
    try:
        model = IotaModel(cfg, seed=0)
        optimizers = [
            torch.optim.AdamW(
                stage.parameters(),
                lr=defaults.lr,
                betas=(defaults.beta1, defaults.beta2),
                weight_decay=defaults.weight_decay,
            )
            for stage in model.stages
        ]
        for n in range(k):
            tokens = batch_tokens(corpus, schedule.batch(n, b), t)
            next_token_loss(model(tokens), tokens).backward()
            for stage, optimizer in zip(model.stages, optimizers, strict=True):
                torch.nn.utils.clip_grad_norm_(stage.parameters(), defaults.grad_clip)
                optimizer.step()
                optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)

    assert sorted(snapshots) == [0, 1, 2]
    for s, stage in enumerate(model.stages):
        expected = stage.state_dict()
        assert snapshots[s].keys() == expected.keys()
        changed = 0
        for name, value in expected.items():
            # Stated tolerance: fp32 rounding only. In practice the same kernels give the same bits.
            torch.testing.assert_close(snapshots[s][name], value, rtol=0, atol=1e-6, msg=f"stage {s} {name}")
            changed += int(not torch.equal(value, IotaModel(cfg, seed=0).stages[s].state_dict()[name]))
        assert changed > 0  # the weights did train: the comparison is not between two initialisations


def test_a_killed_miners_work_is_requeued_and_the_run_goes_on(tmp_path: Path) -> None:
    n = 30
    options = DevnetOptions(
        batch_size=4,
        seq_len=64,
        workdir=tmp_path,
        extra_env={"IOTA_ORCH_MINER_TIMEOUT_S": "4", "IOTA_ORCH_MAX_SAMPLES": str(n)},
    )
    net = start(options, miners=4)  # the fourth joins a stage, which then has two replicas
    try:
        net.wait_for(lambda s: s.samples_completed >= 5, timeout_s=90)
        stage_of = {m.hotkey: m.stage for m in net.status().miners}
        # Which stage gets the fourth depends on the throughput the orchestrator measured so far.
        doubled = next(s for s in range(3) if sum(st == s for st in stage_of.values()) == 2)
        replicas = [name for name, hk in net.hotkeys.items() if stage_of[hk] == doubled]
        victim = replicas[0]
        net.kill_miner(victim)  # SIGKILL while it holds forwards awaiting their backward
        final = net.wait_for(lambda s: s.samples_completed + s.samples_dropped == n, timeout_s=150)
        failed = events(net, "attempt_failed")
        records = net.losses()
    finally:
        net.stop()
    assert final.samples_dropped == 0 and final.samples_completed == n  # nothing lost
    # Both replicas carried samples: pathways vary across replicas.
    assert {r.pathway[doubled] for r in records} == {net.hotkeys[name] for name in replicas}
    assert final.attempts_failed >= 1 and failed
    assert any(net.hotkeys[victim][:8] in str(e["detail"]) for e in failed)
    victim_state = {m.hotkey: m.state for m in final.miners}[net.hotkeys[victim]]
    assert victim_state == "inactive"
    # Each requeued sample was completed exactly once: the counters match the sample count.
    assert final.samples_issued == n and final.samples_in_flight == 0 and final.samples_waiting_retry == 0


def test_the_orchestrator_killed_and_restarted_resumes_the_run(tmp_path: Path) -> None:
    n = 40
    options = DevnetOptions(
        batch_size=4, seq_len=64, workdir=tmp_path, extra_env={"IOTA_ORCH_MAX_SAMPLES": str(n)}
    )
    net = start(options, miners=3)
    try:
        before = net.wait_for(lambda s: s.samples_completed >= 10, timeout_s=90)
        net.kill_orchestrator()  # SIGKILL: no chance to flush or say goodbye
        time.sleep(2.0)  # the miners notice and retry
        net.start_orchestrator()
        after = net.status()
        assert after.run_id == before.run_id
        assert after.samples_completed >= before.samples_completed
        assert after.samples_issued >= before.samples_issued
        final = net.wait_for(lambda s: s.samples_completed + s.samples_dropped == n, timeout_s=150)
        registrations = events(net, "registered")
    finally:
        net.stop()
    assert final.samples_dropped == 0 and final.samples_completed == n
    # The miners carried on with their sessions: nobody had to register again.
    assert len(registrations) == 3


def test_miners_resync_with_a_new_run_instead_of_exiting(tmp_path: Path) -> None:
    """The operator replaces the run (a new state file): every miner is told its run is gone, registers
    with the new one, and trains on; none exits."""
    options = DevnetOptions(batch_size=4, seq_len=64, workdir=tmp_path)
    net = start(options, miners=3)
    try:
        first = net.wait_for(lambda s: s.samples_completed >= 3, timeout_s=90)
        net.kill_orchestrator()
        (tmp_path / "orchestrator.sqlite").unlink()
        for suffix in ("-wal", "-shm"):
            (tmp_path / f"orchestrator.sqlite{suffix}").unlink(missing_ok=True)
        net.start_orchestrator()
        second = net.wait_for(lambda s: s.samples_completed >= 3, timeout_s=120)
        assert all(proc.poll() is None for proc in net.miners.values())
    finally:
        net.stop()
    assert second.run_id != first.run_id
    assert sorted(m.stage for m in second.miners) == [0, 1, 2]
