"""The whole network on loopback, as `iota devnet` runs it: separate processes, real HTTP, real S3.

These are the slow tests: each starts an orchestrator and miner processes and trains the tiny preset. A
killed miner's work requeued and the orchestrator killed and restarted are among the faults of
`tests/test_faults_e2e.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import DataSettings
from common.data import SampleSchedule, batch_tokens, make_corpus
from common.model import IotaModel, get_preset, next_token_loss
from iota.devnet import Devnet, DevnetOptions
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
        snapshots = dict(net.snapshots().values())
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


def test_miners_resync_with_a_new_run_instead_of_exiting(tmp_path: Path) -> None:
    """The operator replaces the run (a new state file): every miner is told its run is gone, registers
    with the new one, and trains on; none exits."""
    options = DevnetOptions(batch_size=4, seq_len=64, workdir=tmp_path)
    net = start(options, miners=3)
    try:
        first = net.wait_for(lambda s: s.samples_completed >= 3, timeout_s=90)
        net.kill_orchestrator()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"orchestrator.sqlite{suffix}").unlink(missing_ok=True)
        net.start_orchestrator()
        # Each miner registers again on its own schedule (one in its retry back-off comes later).
        second = net.wait_for(lambda s: s.samples_completed >= 3 and len(s.miners) == 3, timeout_s=120)
        assert all(proc.poll() is None for proc in net.miners.values())
    finally:
        net.stop()
    assert second.run_id != first.run_id
    assert sorted(m.stage for m in second.miners) == [0, 1, 2]
