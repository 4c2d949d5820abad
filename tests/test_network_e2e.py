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
