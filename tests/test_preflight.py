"""`iota check`'s decisions (messages, the GPU memory estimate, what is fatal) and its probes, in process.

The start scripts that run these checks as a user does are tested in test_start_scripts.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from common.chain import Neuron
from common.config import ChainSettings, WalletSettings
from common.model import ModelConfig, get_preset, stage_sizes
from iota import preflight
from iota.cli import app
from iota.preflight import (
    DeviceSetting,
    Preflight,
    Role,
    StageMemory,
    count_stage_parameters,
    estimate_stage_memory,
    gpu_result,
    memory_result,
    permit_result,
    settings_error_message,
    state_path_result,
)
from miner.settings import MinerSettings
from tests.operator_env import dead_port

GIB = 2**30
SS58 = "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX"
MINER_DEVICE = DeviceSetting("IOTA_MINER_DEVICE", "cuda")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No IOTA_ variable from the outside and no stray .env: only what the test sets."""
    import os

    for name in list(os.environ):
        if name.startswith("IOTA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_a_bad_setting_is_named_by_its_variable_without_a_traceback() -> None:
    with pytest.raises(ValidationError) as info:
        MinerSettings(_env_file=None, poll_wait_s="soon")  # type: ignore[arg-type]
    message = settings_error_message(MinerSettings, info.value, ".env")
    assert message.startswith("bad setting: IOTA_MINER_POLL_WAIT_S='soon': Input should be a valid number")
    assert message.endswith("Fix it in .env or in the environment")


def test_the_settings_check_reports_the_bad_value(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTA_CHAIN_BACKEND", "ethereum")
    result = Preflight(Role.validator).check_settings()
    assert result.fatal
    assert "IOTA_CHAIN_BACKEND='ethereum': Input should be 'local' or 'bittensor'" in result.message


# ---------------------------------------------------------------------------------------------------------
# GPU


def test_a_cuda_device_without_a_gpu_is_fatal() -> None:
    result, _ = gpu_result(MINER_DEVICE, [], None, require_gpu=False)
    assert result.fatal
    assert result.message.startswith("no GPU: IOTA_MINER_DEVICE=cuda but torch sees no CUDA device")
    assert "CPU build of torch" in result.message
    driver, _ = gpu_result(MINER_DEVICE, [], "12.4", require_gpu=False)
    assert "NVIDIA driver" in driver.message


def test_auto_without_a_gpu_trains_on_the_cpu_unless_a_gpu_is_required() -> None:
    auto = DeviceSetting("IOTA_MINER_DEVICE", "auto")
    result, device = gpu_result(auto, [], None, require_gpu=False)
    assert (result.status, device) == ("warn", "cpu")
    assert "training on the CPU" in result.message and "IOTA_MINER_REQUIRE_GPU=true" in result.message
    required, _ = gpu_result(auto, [], None, require_gpu=True)
    assert required.fatal
    assert required.message.startswith("no GPU: IOTA_MINER_REQUIRE_GPU=true but torch sees no CUDA device")


def test_the_device_the_daemon_will_use() -> None:
    gpus = ["NVIDIA A100", "NVIDIA A100"]
    assert gpu_result(DeviceSetting("X", "auto"), gpus, "12.4")[1] == "cuda:0"
    assert gpu_result(DeviceSetting("X", "cuda:1"), gpus, "12.4")[1] == "cuda:1"
    assert gpu_result(DeviceSetting("X", "cpu"), gpus, "12.4")[0].status == "ok"
    missing, _ = gpu_result(DeviceSetting("IOTA_MINER_DEVICE", "cuda:2"), gpus, "12.4")
    assert missing.fatal and "cuda:0 to cuda:1" in missing.message
    # The validator has no IOTA_MINER_REQUIRE_GPU to suggest.
    replays, _ = gpu_result(DeviceSetting("IOTA_VALIDATOR_DEVICE", "auto"), [], None, work="replays run")
    assert replays.status == "warn" and "REQUIRE_GPU" not in replays.message


# ---------------------------------------------------------------------------------------------------------
# GPU memory


def _estimates(preset: str, batch: int, seq: int, in_flight: int) -> list[StageMemory]:
    cfg = get_preset(preset)
    return [estimate_stage_memory(cfg, size, batch, seq, in_flight) for size in count_stage_parameters(cfg)]


@pytest.mark.parametrize("preset", ["tiny", "1.5b", "15b"])
def test_the_parameter_count_is_the_models(preset: str) -> None:
    cfg = get_preset(preset, bottleneck_ratio=32)  # a ratio no preset uses, so b is counted, not assumed
    assert count_stage_parameters(cfg) == stage_sizes(cfg)


def test_the_memory_estimate_counts_states_stashes_and_activations() -> None:
    head, body, tail = _estimates("1.5b", batch=8, seq=1024, in_flight=4)
    for stage in (head, body, tail):
        assert stage.states == stage.parameters * 16  # fp32 weights, gradients and AdamW moments
        assert stage.margin == pytest.approx(0.1 * (stage.total - stage.margin), abs=1)
    # Every stage but the tail keeps up to in_flight forwards, each with its own copy of the weights but
    # the embedding tables (the body's own token embedding, vocab x token_dim), which they share.
    cfg = get_preset("1.5b")
    table = cfg.vocab_size * cfg.token_dim
    assert (body.held_forwards, body.stash) == (4, 4 * (body.parameters - table) * 4)
    assert head.stash == 4 * (head.parameters - cfg.vocab_size * cfg.d_model) * 4
    assert (tail.held_forwards, tail.stash) == (1, 0)
    # Activations grow with the tokens held.
    (_, body_one, _) = _estimates("1.5b", batch=1, seq=1024, in_flight=1)
    assert body.activations == 32 * body_one.activations
    # Sanity against the docs: one 1x1024 forward of a 1.5b stage fits a 16 GiB card, 4 of 8x1024 do not.
    assert body_one.total < 16 * GIB < body.total


def _default_run_estimates(cfg: ModelConfig) -> list[StageMemory]:
    """The estimate `iota check miner` makes for a run of `cfg` at the defaults: the data's batch and
    sequence, the orchestrator's max_outstanding."""
    from common.config import DataSettings
    from orchestrator.settings import OrchestratorSettings

    batch = DataSettings.model_fields["batch_size"].default
    seq = DataSettings.model_fields["seq_len"].default
    in_flight = OrchestratorSettings.model_fields["max_outstanding"].default
    return [estimate_stage_memory(cfg, size, batch, seq, in_flight) for size in count_stage_parameters(cfg)]


# A "16 GB" card as sold (16e9 bytes; most have 16 GiB) less what the CUDA context takes.
CARD_16GB = 16 * 10**9 - GIB // 2


def test_every_15b_stage_fits_a_16gb_card_at_the_runs_defaults() -> None:
    estimates = _default_run_estimates(get_preset("15b"))
    assert all(e.total <= CARD_16GB for e in estimates), [
        f"{e.stage}: {e.total / GIB:.1f}" for e in estimates
    ]
    # The preset before did not (2 blocks a body stage, AdamW everywhere): not one of its stages fits.
    before = get_preset("15b", stage_blocks=(1,) + (2,) * 24 + (1,), vocab_optimizer="adamw")
    assert min(e.total for e in _default_run_estimates(before)) > CARD_16GB
    # The optimizer is what lets the tail fit: with AdamW on its LM head it would not.
    adamw_tail = _default_run_estimates(get_preset("15b", vocab_optimizer="adamw"))[-1]
    assert adamw_tail.total > CARD_16GB > estimates[-1].total
    assert estimates[-1].optimizer < adamw_tail.optimizer / 2


def test_the_15b_model_still_grows_with_its_stages() -> None:
    cfg = get_preset("15b")
    assert sum(s.parameters for s in count_stage_parameters(cfg)) > 14e9
    wider = cfg.with_overrides(stage_blocks=(0,) + (1,) * 60)
    assert sum(s.parameters for s in count_stage_parameters(wider)) > 17e9
    assert all(e.total <= CARD_16GB for e in _default_run_estimates(wider))


@pytest.mark.parametrize("preset", ["tiny", "100m", "15b"])
def test_the_estimates_vocabulary_and_tables_are_the_modules(preset: str) -> None:
    from common.model import build_stage
    from common.optim import embedding_table_names, vocab_parameter_names

    cfg = get_preset(preset, stage_blocks=(1, 0, 1))  # few blocks: the tables are what is counted
    for stage in range(cfg.n_stages):
        module = build_stage(cfg, stage, device="meta")
        params = dict(module.named_parameters())
        shapes = sorted(tuple(params[n].shape) for n in vocab_parameter_names(module))
        assert shapes == sorted(preflight.stage_vocab_matrices(cfg, stage))
        tables = sum(params[n].numel() for n in embedding_table_names(module))
        assert tables == preflight.stage_embedding_parameters(cfg, stage)


def test_a_stage_that_does_not_fit_fails_with_both_numbers_and_the_advice() -> None:
    estimates = _estimates("1.5b", batch=2, seq=1024, in_flight=2)
    largest = max(e.total for e in estimates)
    smallest = min(estimates, key=lambda e: e.total)
    runner_up = sorted(e.total for e in estimates)[1]
    free = (smallest.total + runner_up) // 2  # room for the smallest stage only
    result = memory_result(estimates, None, free, 16 * GIB, device="cuda:0", preset="1.5b", batch=2, seq=1024)
    assert result.fatal
    assert f"it needs about {largest / GIB:,.1f} GiB" in result.message
    assert f"cuda:0 has {free / GIB:,.1f} GiB free of 16.0 GiB" in result.message
    assert f"IOTA_MINER_STAGE (stages that fit: {smallest.stage} " in result.message
    assert "or use a bigger GPU" in result.message

    asked = memory_result(
        estimates, smallest.stage, free, 16 * GIB, device="cuda:0", preset="1.5b", batch=2, seq=1024
    )
    assert asked.status == "ok" and f"stage {smallest.stage} of the 1.5b run" in asked.message
    none_fit = memory_result(estimates, None, GIB, GIB, device="cuda:0", preset="1.5b", batch=2, seq=1024)
    assert none_fit.fatal and "no stage of this run fits: use a bigger GPU" in none_fit.message
    bad_stage = memory_result(estimates, 7, free, free, device="cuda:0", preset="1.5b", batch=2, seq=1024)
    assert bad_stage.fatal and "IOTA_MINER_STAGE=7 but the 1.5b run has 3 stages" in bad_stage.message


def test_the_memory_check_estimates_the_runs_stage_against_the_free_memory(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: the run's shape is set as /v1/status would give it, and the free memory as CUDA would.
    import torch

    from common.protocol import RunStatus

    monkeypatch.setenv("IOTA_MINER_STAGE", "1")
    check = Preflight(Role.miner)
    assert not check.check_settings().fatal
    check.device = "cuda:0"
    # 4 stages instead of the preset's 3: the check splits the blocks as the orchestrator does.
    check.status = RunStatus.model_construct(preset="1.5b", n_stages=4, batch_size=1, seq_len=1024)
    free = {"bytes": 8 * GIB}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 16 * GIB))
    short = check.check_gpu_memory()
    assert short.fatal and "not enough GPU memory for stage 1 of the 1.5b run" in short.message
    assert "cuda:0 has 8.0 GiB free of 16.0 GiB" in short.message
    free["bytes"] = 16 * GIB
    assert check.check_gpu_memory().status == "ok"
    check.device = "cpu"
    assert check.check_gpu_memory().status == "skip"


# ---------------------------------------------------------------------------------------------------------
# Chain, permit, state, orchestrator


def test_a_validator_needs_a_permit_and_is_told_its_stake() -> None:
    neuron = Neuron(uid=3, hotkey=SS58, coldkey="", stake=12.5, validator_permit=False)
    refused = permit_result(neuron, 9)
    assert refused.fatal and "has no validator permit on netuid 9" in refused.message
    assert "stake 12.50" in refused.message
    permitted = permit_result(neuron.model_copy(update={"validator_permit": True}), 9)
    assert permitted.status == "ok" and "stake 12.50" in permitted.message


def test_registration_on_the_real_chain_says_how_to_register() -> None:
    chain = ChainSettings(_env_file=None, backend="bittensor", network="test", netuid=9)
    message = preflight.not_registered_message(
        SS58, WalletSettings(_env_file=None, name="w", hotkey="h"), chain
    )
    assert "is not registered on netuid 9 on the bittensor network 'test'" in message
    assert "btcli subnets register --netuid 9 --wallet-name w --wallet-hotkey h --network test" in message


def test_an_unreachable_chain_is_its_own_failure(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.keys import create_hotkey

    monkeypatch.setenv("IOTA_WALLET_PATH", str(clean_env / "wallets"))
    monkeypatch.setenv("IOTA_CHAIN_BACKEND", "bittensor")
    monkeypatch.setenv("IOTA_CHAIN_NETWORK", f"ws://127.0.0.1:{dead_port()}")
    create_hotkey("default", "default", clean_env / "wallets")
    check = Preflight(Role.miner)
    assert not check.check_settings().fatal and not check.check_wallet().fatal
    result = check.check_registration()
    assert result.fatal
    assert result.message.startswith("cannot read netuid 9 on the bittensor network 'ws://127.0.0.1:")
    assert "check IOTA_CHAIN_NETWORK" in result.message


def test_within_bounds_a_call_that_does_not_answer() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        preflight.within(0.2, lambda: time.sleep(5))
    # Under 4 s: it gave up before the 5 s call ended (2 s was tight on a loaded 2-core machine).
    assert time.monotonic() - start < 4
    with pytest.raises(ZeroDivisionError):
        preflight.within(1, lambda: 1 / 0)
    assert preflight.within(1, lambda: 42) == 42


def test_the_state_folder_must_be_writable(tmp_path: Path) -> None:
    assert state_path_result(tmp_path / "new" / "state.sqlite").status == "ok"
    (tmp_path / "a-file").write_text("")
    result = state_path_result(tmp_path / "a-file" / "state.sqlite")
    assert result.fatal and "is not a writable folder" in result.message


def test_check_json_reports_each_check_and_fails_at_the_first(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = dead_port()
    monkeypatch.setenv("IOTA_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("IOTA_ORCH_STATE_PATH", str(clean_env / "state.sqlite"))
    monkeypatch.setenv("IOTA_CHAIN_LOCAL_PATH", str(clean_env / "chain.json"))
    result = CliRunner().invoke(app, ["check", "orchestrator", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(c["name"], c["status"]) for c in report["checks"]] == [
        ("settings", "warn"),  # no .env here: defaults and the environment
        ("chain", "ok"),
        ("s3", "fail"),  # and the state check never ran
    ]
    assert f"cannot use S3 at http://127.0.0.1:{port} (bucket 'iota')" in report["checks"][2]["message"]
    assert not (clean_env / "chain.json").exists()  # checking created nothing
