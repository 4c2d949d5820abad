"""`iota check miner|validator|orchestrator`: what a role needs before it starts, checked in order.

The start scripts run this before the daemon, so that a missing wallet, an unregistered hotkey, an
unreachable orchestrator, chain or S3, or a missing or too small GPU stops the start at once with one plain
line saying what to do, instead of a traceback or a retry loop minutes later. The first failure ends the
run (later checks would only repeat it). The decisions (messages, the memory estimate, what is fatal) are
pure functions the tests call directly; the probes around them are thin.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from common.config import ChainSettings, S3Settings, WalletSettings, env_file

if TYPE_CHECKING:
    from bittensor.sp_core import Keypair

    from common.chain import Neuron
    from common.model import ModelConfig, StageSize
    from common.protocol import RunStatus

T = TypeVar("T")

GIB = 2**30
HTTP_TIMEOUT_S = 5.0
S3_TIMEOUT_S = 5.0
# A real subnet's metagraph is one large read; this bounds only a chain that does not answer.
CHAIN_TIMEOUT_S = 30.0


class Role(StrEnum):
    miner = "miner"
    validator = "validator"
    orchestrator = "orchestrator"


Status = Literal["ok", "warn", "skip", "fail"]


class CheckResult(BaseModel):
    """One check's outcome. `warn` and `skip` pass; `fail` stops the start."""

    name: str
    status: Status
    message: str

    @property
    def fatal(self) -> bool:
        return self.status == "fail"


class CheckReport(BaseModel):
    """What `iota check ROLE --json` prints."""

    role: Role
    ok: bool
    env_file: str
    checks: list[CheckResult]


def ok(name: str, message: str) -> CheckResult:
    return CheckResult(name=name, status="ok", message=message)


def warn(name: str, message: str) -> CheckResult:
    return CheckResult(name=name, status="warn", message=message)


def skip(name: str, message: str) -> CheckResult:
    return CheckResult(name=name, status="skip", message=message)


def fail(name: str, message: str) -> CheckResult:
    return CheckResult(name=name, status="fail", message=message)


# ---------------------------------------------------------------------------------------------------------
# Pure decisions: messages and verdicts


def env_name(settings_cls: type[BaseSettings], field: str) -> str:
    """The variable that sets `field` of `settings_cls`, e.g. IOTA_MINER_DEVICE."""
    return f"{settings_cls.model_config.get('env_prefix', '')}{field}".upper()


def settings_error_message(settings_cls: type[BaseSettings], error: ValidationError, source: str) -> str:
    """Pydantic's complaint about each bad value, named by its variable, without a traceback."""
    problems = []
    for e in error.errors():
        name = env_name(settings_cls, "_".join(str(part) for part in e["loc"]))
        value = e.get("input")
        # Never echo a secret; other values help the user spot the typo.
        shown = "" if "SECRET" in name or "KEY" in name or isinstance(value, dict) else f"={value!r}"
        problems.append(f"{name}{shown}: {e['msg']}")
    return f"bad setting: {'; '.join(problems)}. Fix it in {source} or in the environment"


def chain_where(chain: ChainSettings) -> str:
    if chain.backend == "local":
        return f"the local chain {chain.local_path} (netuid {chain.netuid})"
    return f"netuid {chain.netuid} on the bittensor network {chain.network!r}"


def local_chain_missing_message(chain: ChainSettings) -> str:
    return (
        f"no local chain file {chain.local_path} (IOTA_CHAIN_BACKEND=local, IOTA_CHAIN_LOCAL_PATH), so no "
        "hotkey can be registered on it: on the real subnet set IOTA_CHAIN_BACKEND=bittensor; on a local "
        "network point IOTA_CHAIN_LOCAL_PATH at the orchestrator's chain file"
    )


def chain_unreachable_message(chain: ChainSettings, error: BaseException) -> str:
    what = (
        "check IOTA_CHAIN_LOCAL_PATH and IOTA_CHAIN_NETUID"
        if chain.backend == "local"
        else "check IOTA_CHAIN_NETWORK and IOTA_CHAIN_NETUID, and this machine's connection to the chain"
    )
    return f"cannot read {chain_where(chain)}: {type(error).__name__}: {error}. {what}"


def not_registered_message(ss58: str, wallet: WalletSettings, chain: ChainSettings) -> str:
    if chain.backend == "local":
        how = (
            "register it in that file (LocalChain.register, as `iota devnet` does for its own hotkeys), or "
            "check IOTA_CHAIN_LOCAL_PATH and IOTA_CHAIN_NETUID"
        )
    else:
        how = (
            f"register it with `btcli subnets register --netuid {chain.netuid} --wallet-name {wallet.name} "
            f"--wallet-hotkey {wallet.hotkey} --network {chain.network}`, or check IOTA_CHAIN_NETUID / "
            "IOTA_CHAIN_NETWORK and IOTA_WALLET_NAME / IOTA_WALLET_HOTKEY"
        )
    return (
        f"hotkey {ss58} (wallet {wallet.name!r}, hotkey {wallet.hotkey!r}) is not registered on "
        f"{chain_where(chain)}: {how}"
    )


def registered_message(neuron: Neuron, chain: ChainSettings) -> str:
    return f"hotkey {neuron.hotkey} is registered as uid {neuron.uid} on {chain_where(chain)}"


def permit_result(neuron: Neuron, netuid: int) -> CheckResult:
    """A validator needs the chain's validator permit; the stake minimum is the orchestrator's to enforce."""
    if not neuron.validator_permit:
        return fail(
            "validator permit",
            f"hotkey {neuron.hotkey} (uid {neuron.uid}, stake {neuron.stake:,.2f}) has no validator permit "
            f"on netuid {netuid}: the chain grants permits to the subnet's top validators by stake; add "
            "stake to this hotkey (`btcli stake add`) and wait for the next epoch",
        )
    return ok(
        "validator permit",
        f"uid {neuron.uid} holds a validator permit, stake {neuron.stake:,.2f} (the orchestrator also "
        "requires its own minimum, IOTA_ORCH_VALIDATOR_MIN_STAKE)",
    )


def orchestrator_unreachable_message(url: str, setting: str, error: str) -> str:
    return (
        f"cannot reach the orchestrator at {url} (GET /health: {error}): start it, or set {setting} to its "
        "address"
    )


def s3_failure_message(s3: S3Settings, error: BaseException, status: int | None) -> str:
    where = s3.endpoint_url or f"AWS S3 (region {s3.region})"
    if status in (401, 403):
        return (
            f"S3 at {where} refused the credentials for bucket {s3.bucket!r} ({error}): check "
            "IOTA_S3_ACCESS_KEY_ID, IOTA_S3_SECRET_ACCESS_KEY and IOTA_S3_REGION"
        )
    return (
        f"cannot use S3 at {where} (bucket {s3.bucket!r}): {error}. Check IOTA_S3_ENDPOINT_URL and that the "
        "store is running and reachable from here"
    )


def state_path_result(state_path: Path) -> CheckResult:
    """The orchestrator's SQLite file must be writable, or creatable in a writable folder."""
    setting = f"IOTA_ORCH_STATE_PATH={state_path}"
    if state_path.exists():
        if state_path.is_file() and os.access(state_path, os.R_OK | os.W_OK):
            return ok("state", f"the run's state {state_path} is writable")
        return fail("state", f"cannot write the run's state {state_path} ({setting}): fix its permissions")
    folder = state_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and os.access(folder, os.W_OK | os.X_OK):
        return ok("state", f"the run's state {state_path} will be created (folder {folder} is writable)")
    return fail(
        "state",
        f"cannot create the run's state {state_path} ({setting}): {folder} is not a writable folder. "
        "Choose a folder this user can write, or fix its permissions",
    )


@dataclass(frozen=True)
class DeviceSetting:
    """A device setting as the daemons read it: `auto`, `cpu`, `cuda` or `cuda:N` (else passed to torch)."""

    name: str  # the variable, e.g. IOTA_MINER_DEVICE
    value: str


def gpu_result(
    device: DeviceSetting,
    gpus: list[str],
    torch_cuda: str | None,
    *,
    require_gpu: bool | None = None,
    work: str = "training",
) -> tuple[CheckResult, str]:
    """The verdict on the device setting given the CUDA devices torch sees (their names), and the device the
    daemon will use. `torch_cuda` is torch.version.cuda (None for a CPU build of torch); `require_gpu` is
    IOTA_MINER_REQUIRE_GPU (None for a role without that setting)."""
    value = device.value
    why_none = (
        # IOTA_MINER_DEVICE -> miner: the role's own install, not the dev one.
        f"this is a CPU build of torch: run ./setup.sh --role {device.name.split('_')[1].lower()} --cuda"
        if torch_cuda is None
        else f"torch is built for CUDA {torch_cuda}: is the NVIDIA driver installed? try nvidia-smi"
    )
    if value == "cpu":
        return ok("gpu", f"{work} on the CPU ({device.name}=cpu)"), "cpu"
    if value == "auto":
        if gpus:
            return ok("gpu", f"{work} on cuda:0, {gpus[0]} ({device.name}=auto)"), "cuda:0"
        if require_gpu:
            return fail(
                "gpu",
                f"no GPU: IOTA_MINER_REQUIRE_GPU=true but torch sees no CUDA device ({why_none}). Set "
                f"{device.name}=cpu and IOTA_MINER_REQUIRE_GPU=false to train on the CPU",
            ), "cpu"
        hint = (
            "" if require_gpu is None else "; set IOTA_MINER_REQUIRE_GPU=true to refuse to start without one"
        )
        return warn("gpu", f"no GPU: {work} on the CPU ({device.name}=auto{hint})"), "cpu"
    if value == "cuda" or value.startswith("cuda:"):
        index_text = value.partition(":")[2] or "0"
        if not gpus:
            return fail(
                "gpu", f"no GPU: {device.name}={value} but torch sees no CUDA device ({why_none})"
            ), value
        if not index_text.isdigit() or int(index_text) >= len(gpus):
            return fail(
                "gpu",
                f"{device.name}={value} but torch sees {len(gpus)} CUDA device(s), cuda:0 to "
                f"cuda:{len(gpus) - 1}: pick one of those",
            ), value
        index = int(index_text)
        return ok("gpu", f"{work} on cuda:{index}, {gpus[index]} ({device.name}={value})"), f"cuda:{index}"
    return warn("gpu", f"{device.name}={value} is passed to torch as it is; not checked here"), value


@dataclass(frozen=True)
class StageMemory:
    """An estimate of the GPU memory one stage needs to train, in bytes, by what holds it."""

    stage: int
    role: str
    parameters: int
    states: int  # fp32 weights and gradients, and the optimizer's state (`optimizer` of it)
    stash: int  # weight copies kept for outstanding forwards (PipeDream weight stashing)
    activations: int  # what autograd keeps for the forwards awaiting their backward
    held_forwards: int
    margin: int
    optimizer: int = 0  # the optimizer's part of `states`: AdamW's moments, or factored statistics

    @property
    def total(self) -> int:
        return self.states + self.stash + self.activations + self.margin


# fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32 moments (8), per parameter: the same count as
# TRAINING_BYTES_PER_PARAM in iota/cli.py (`iota presets`). A preset with vocab_optimizer="factored" pays
# the 8 of AdamW's moments only off its vocabulary matrices (`stage_optimizer_bytes`).
TRAINING_BYTES_PER_PARAM = 16
WEIGHT_AND_GRAD_BYTES_PER_PARAM = 8
# Allocator fragmentation and workspaces on top of what the tensors hold.
MEMORY_MARGIN = 0.10


def count_stage_parameters(cfg: ModelConfig) -> list[StageSize]:
    """common.model's stage_sizes by arithmetic: building even meta-device modules costs seconds on first
    use (torch loads its meta kernels lazily), too slow for a start-up check. A test keeps the two equal."""
    from common.model import StageSize

    d, b, v = cfg.d_model, cfg.bottleneck_dim, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    # Two RMSNorms, the q/k/v/o projections and SwiGLU's three matrices; no biases anywhere.
    block = 2 * d + d * q + 2 * d * kv + q * d + 3 * d * cfg.ffn_hidden
    sizes = []
    for stage, blocks in enumerate(cfg.stage_blocks):
        head, tail = stage == 0, stage == cfg.n_stages - 1
        entry = v * d if head else b * d  # the embedding, or the bottleneck decoder
        if not head and cfg.stage_tokens:  # the stage's own token embedding, projected up when narrower
            entry += v * cfg.token_dim + (cfg.token_dim * d if cfg.token_dim < d else 0)
        exit_ = d + d * v if tail else d + d * b  # final norm and LM head, or the bottleneck encoder
        role = "head" if head else "tail" if tail else "body"
        sizes.append(
            StageSize(stage=stage, role=role, blocks=blocks, parameters=entry + blocks * block + exit_)
        )
    return sizes


def stage_vocab_matrices(cfg: ModelConfig, stage: int) -> list[tuple[int, int]]:
    """(rows, cols) of the stage's vocabulary matrices, as common.optim.vocab_parameter_names finds them on
    the module: the head's embedding, a later stage's own token embedding, the tail's LM head."""
    head, tail = stage == 0, stage == cfg.n_stages - 1
    shapes = []
    if head:
        shapes.append((cfg.vocab_size, cfg.d_model))
    elif cfg.stage_tokens:
        shapes.append((cfg.vocab_size, cfg.token_dim))
    if tail:
        shapes.append((cfg.vocab_size, cfg.d_model))
    return shapes


def stage_embedding_parameters(cfg: ModelConfig, stage: int) -> int:
    """Parameters of the stage's embedding tables, which the trainer does not stash (common.optim's
    embedding_table_names): all its vocabulary matrices but the tail's LM head."""
    shapes = stage_vocab_matrices(cfg, stage)
    if stage == cfg.n_stages - 1:
        shapes = shapes[:-1]
    return sum(rows * cols for rows, cols in shapes)


def stage_optimizer_bytes(cfg: ModelConfig, size: StageSize) -> int:
    """The inner optimizer's state for the stage, as common.optim.build_inner_optimizer builds it: AdamW's
    two fp32 moments on every parameter, except the vocabulary matrices of a `factored` preset, which keep
    a row and a column statistic each (plus one chunk's temporaries during the step)."""
    from common.optim import FACTORED_WORKSPACE_BYTES, optimizer_state_per_matrix

    vocab = stage_vocab_matrices(cfg, size.stage)
    if cfg.vocab_optimizer != "factored" or not vocab:
        return size.parameters * (TRAINING_BYTES_PER_PARAM - WEIGHT_AND_GRAD_BYTES_PER_PARAM)
    vocab_params = sum(rows * cols for rows, cols in vocab)
    factored = sum(optimizer_state_per_matrix(rows, cols, "factored") for rows, cols in vocab)
    rest = optimizer_state_per_matrix(1, size.parameters - vocab_params, "adamw")
    return rest + factored + FACTORED_WORKSPACE_BYTES


def estimate_stage_memory(
    cfg: ModelConfig, size: StageSize, batch: int, seq: int, in_flight: int
) -> StageMemory:
    """GPU memory to train stage `size.stage` of `cfg` with batches of batch x seq tokens and up to
    `in_flight` forwards awaiting their backward.

    This is an estimate, not a measurement: a count of the tensors the trainer keeps under bf16 autocast
    (bench/stage_memory.py measures the real peak on a GPU). Per block and token autograd keeps about
    36·d bytes (the fp32 residual and RMSNorm tensors, bf16 q/k/v, rotary and attention outputs; SDPA's
    fused kernels keep no seq x seq scores) plus 8·ffn bytes (SwiGLU's gate, up, product and the down
    projection's input). The head also keeps its fp32 embedding output; the tail runs one forward at a time
    (forward, loss and backward together) but holds bf16 logits, their fp32 log-softmax and its gradient.
    Every other stage keeps up to `in_flight` forwards, each of which may hold its own fp32 copy of the
    weights (weight stashing, so that pipelined backwards are exact) but for the embedding tables, which
    the forwards share. The optimizer's state follows the preset's `vocab_optimizer`.
    """
    tokens = batch * seq
    tail = size.role == "tail"
    held = 1 if tail else in_flight
    per_token = size.blocks * (36 * cfg.d_model + 8 * cfg.ffn_hidden)
    if size.role == "head":
        per_token += 4 * cfg.d_model
    activations = held * tokens * per_token
    if tail:
        activations += tokens * cfg.vocab_size * (2 + 4 + 4)
    optimizer = stage_optimizer_bytes(cfg, size)
    states = size.parameters * WEIGHT_AND_GRAD_BYTES_PER_PARAM + optimizer
    stashed = size.parameters - stage_embedding_parameters(cfg, size.stage)
    stash = 0 if tail else in_flight * stashed * 4
    margin = math.ceil((states + stash + activations) * MEMORY_MARGIN)
    return StageMemory(
        stage=size.stage,
        role=size.role,
        parameters=size.parameters,
        states=states,
        stash=stash,
        activations=activations,
        held_forwards=held,
        margin=margin,
        optimizer=optimizer,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:,.1f} GiB"


def memory_result(
    estimates: list[StageMemory],
    stage: int | None,
    free: int,
    total: int,
    *,
    device: str,
    preset: str,
    batch: int,
    seq: int,
) -> CheckResult:
    """Whether the stage (the one IOTA_MINER_STAGE asks for, else the largest: the orchestrator may assign
    any) fits in the device's free memory."""
    name = "gpu memory"
    if stage is not None and not 0 <= stage < len(estimates):
        return fail(
            name,
            f"IOTA_MINER_STAGE={stage} but the {preset} run has {len(estimates)} stages (0 to "
            f"{len(estimates) - 1}): set one of those, or leave it empty to let the orchestrator choose",
        )
    chosen = estimates[stage] if stage is not None else max(estimates, key=lambda e: e.total)
    which = f"stage {chosen.stage}" if stage is not None else f"the largest stage ({chosen.stage})"
    have = f"{device} has {_gib(free)} free of {_gib(total)}"
    if chosen.total <= free:
        return ok(name, f"{which} of the {preset} run needs about {_gib(chosen.total)} (an estimate); {have}")
    parts = [f"{_gib(chosen.states)} weights, gradients and optimizer state"]
    if chosen.stash:
        parts.append(f"{_gib(chosen.stash)} stashed weights")
    parts.append(
        f"{_gib(chosen.activations)} activations of {chosen.held_forwards} forward(s) of {batch}x{seq} tokens"
    )
    fits = [e for e in estimates if e.total <= free]
    if fits:
        options = ", ".join(f"{e.stage} ({_gib(e.total)})" for e in fits)
        advice = (
            f"ask for a smaller stage with IOTA_MINER_STAGE (stages that fit: {options}), or use a bigger GPU"
        )
    else:
        advice = "no stage of this run fits: use a bigger GPU"
    if free < total * 0.9:
        advice += f" (other processes hold {_gib(total - free)} of this GPU)"
    return fail(
        name,
        f"not enough GPU memory for {which} of the {preset} run: it needs about {_gib(chosen.total)} "
        f"(estimate: {', '.join(parts)}, plus {MEMORY_MARGIN:.0%}); {have}: {advice}",
    )


# ---------------------------------------------------------------------------------------------------------
# Probes


def within(seconds: float, call: Callable[[], T]) -> T:
    """`call()`'s result, or TimeoutError after `seconds`: some clients (the chain's) retry for minutes."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            box["error"] = error

    # A daemon thread: one still stuck when the check exits does not keep the process alive.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _settings_groups(role: Role) -> list[type[BaseSettings]]:
    from common.config import AuthSettings, DataSettings, LogSettings, ModelSettings

    if role is Role.miner:
        from miner.settings import MinerSettings

        groups: list[type[BaseSettings]] = [WalletSettings, ChainSettings, DataSettings, MinerSettings]
    elif role is Role.validator:
        from validator.settings import ValidatorSettings

        groups = [WalletSettings, ChainSettings, DataSettings, ValidatorSettings]
    else:
        from orchestrator.settings import OrchestratorSettings

        groups = [OrchestratorSettings, S3Settings, ChainSettings, AuthSettings, ModelSettings, DataSettings]
    return [*groups, LogSettings]


class Preflight:
    """The checks of one role, run in order; each probe keeps what later checks need."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.env_file = env_file()
        self.settings: dict[type[BaseSettings], BaseSettings] = {}
        self.keypair: Keypair | None = None
        self.neuron: Neuron | None = None
        self.status: RunStatus | None = None
        self.status_error = ""
        self.device = "cpu"

    def checks(self) -> list[Callable[[], CheckResult]]:
        if self.role is Role.orchestrator:
            return [self.check_settings, self.check_chain, self.check_s3, self.check_state]
        common = [self.check_settings, self.check_wallet, self.check_registration, self.check_orchestrator]
        if self.role is Role.validator:
            return [*common, self.check_permit, self.check_gpu]
        return [*common, self.check_gpu, self.check_gpu_memory]

    def run(self) -> Iterator[CheckResult]:
        """Each check's result as it completes, stopping after the first failure."""
        for check in self.checks():
            result = check()
            yield result
            if result.fatal:
                return

    def get(self, cls: type[Any]) -> Any:
        return self.settings[cls]

    # -- all roles ----------------------------------------------------------------------------------------

    def check_settings(self) -> CheckResult:
        for cls in _settings_groups(self.role):
            try:
                self.settings[cls] = cls()
            except ValidationError as error:
                return fail("settings", settings_error_message(cls, error, self.env_file))
        if Path(self.env_file).is_file():
            return ok("settings", f"settings from {self.env_file} and the environment are valid")
        return warn(
            "settings", f"no settings file {self.env_file}: the environment and the defaults are valid"
        )

    def check_wallet(self) -> CheckResult:
        from common.keys import WalletError, load_hotkey

        wallet = self.get(WalletSettings)
        try:
            self.keypair = load_hotkey(wallet)
        except WalletError as error:
            return fail("wallet", f"{error}")
        return ok(
            "wallet", f"hotkey {wallet.hotkey!r} of wallet {wallet.name!r}: {self.keypair.ss58_address}"
        )

    def check_registration(self) -> CheckResult:
        from common.chain import make_chain

        chain_settings: ChainSettings = self.get(ChainSettings)
        wallet: WalletSettings = self.get(WalletSettings)
        assert self.keypair is not None
        ss58 = self.keypair.ss58_address
        if chain_settings.backend == "local" and not chain_settings.local_path.is_file():
            return fail("registration", local_chain_missing_message(chain_settings))
        try:
            self.neuron = within(CHAIN_TIMEOUT_S, lambda: make_chain(chain_settings, wallet).neuron(ss58))
        except Exception as error:  # the SDK raises its own errors and transport ones; all mean unreachable
            return fail("registration", chain_unreachable_message(chain_settings, error))
        if self.neuron is None:
            return fail("registration", not_registered_message(ss58, wallet, chain_settings))
        return ok("registration", registered_message(self.neuron, chain_settings))

    # -- miner and validator ------------------------------------------------------------------------------

    def _role_settings(self) -> Any:
        from miner.settings import MinerSettings
        from validator.settings import ValidatorSettings

        return self.get(MinerSettings if self.role is Role.miner else ValidatorSettings)

    def check_orchestrator(self) -> CheckResult:
        from common.protocol import HEALTH, STATUS, RunStatus

        settings = self._role_settings()
        setting = env_name(type(settings), "orchestrator_url")
        url = settings.orchestrator_url.rstrip("/")
        try:
            with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
                health = http.get(f"{url}{HEALTH.path}")
                if health.status_code != 200:
                    detail = f"HTTP {health.status_code}: {health.text[:200]}"
                    return fail("orchestrator", orchestrator_unreachable_message(url, setting, detail))
                status = http.get(f"{url}{STATUS.path}")
            self.status = RunStatus.model_validate_json(status.content)
        except httpx.HTTPError as error:
            return fail(
                "orchestrator",
                orchestrator_unreachable_message(url, setting, f"{type(error).__name__}: {error}"),
            )
        except ValidationError as error:
            # Reachable, but its status is not what this version reads: only the memory estimate needs it.
            self.status_error = (
                f"its /v1/status does not match this version of iota ({error.error_count()} errors)"
            )
            return ok("orchestrator", f"{url} answers (run {health.json().get('run_id', '?')})")
        s = self.status
        return ok(
            "orchestrator",
            f"{url} answers: run {s.run_id}, preset {s.preset}, {s.n_stages} stages, batch "
            f"{s.batch_size}x{s.seq_len}",
        )

    def check_permit(self) -> CheckResult:
        assert self.neuron is not None
        return permit_result(self.neuron, self.get(ChainSettings).netuid)

    def check_gpu(self) -> CheckResult:
        import torch

        settings = self._role_settings()
        setting = DeviceSetting(env_name(type(settings), "device"), settings.device)
        gpus = (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else []
        )
        miner = self.role is Role.miner
        result, self.device = gpu_result(
            setting,
            gpus,
            torch.version.cuda,
            require_gpu=settings.require_gpu if miner else None,
            work="training" if miner else "replays run",
        )
        return result

    def check_gpu_memory(self) -> CheckResult:
        name = "gpu memory"
        if not self.device.startswith("cuda"):
            return skip(name, f"not checked: {self.device} is not a GPU")
        if self.status is None:
            return warn(name, f"cannot estimate what the stage needs: {self.status_error or 'no run status'}")
        import torch

        from common.model import PRESETS, get_preset
        from common.model.config import split_blocks
        from orchestrator.settings import OrchestratorSettings

        s = self.status
        if s.preset not in PRESETS:
            return warn(name, f"cannot estimate what the stage needs: unknown preset {s.preset!r}")
        cfg = get_preset(s.preset)
        if cfg.n_stages != s.n_stages:
            cfg = cfg.with_overrides(stage_blocks=split_blocks(cfg.n_layers, s.n_stages))
        # The run's max_outstanding is not public; assume the orchestrator's default.
        in_flight = OrchestratorSettings.model_fields["max_outstanding"].default
        estimates = [
            estimate_stage_memory(cfg, size, s.batch_size, s.seq_len, in_flight)
            for size in count_stage_parameters(cfg)
        ]
        free, total = torch.cuda.mem_get_info(torch.device(self.device))
        return memory_result(
            estimates,
            self._role_settings().stage,
            free,
            total,
            device=self.device,
            preset=s.preset,
            batch=s.batch_size,
            seq=s.seq_len,
        )

    # -- orchestrator -------------------------------------------------------------------------------------

    def check_chain(self) -> CheckResult:
        from common.chain import make_chain

        chain_settings: ChainSettings = self.get(ChainSettings)
        if chain_settings.backend == "local" and not chain_settings.local_path.exists():
            return ok("chain", f"{chain_where(chain_settings)} will be created at start")
        try:
            metagraph = within(CHAIN_TIMEOUT_S, lambda: make_chain(chain_settings).metagraph())
        except Exception as error:  # as in check_registration
            return fail("chain", chain_unreachable_message(chain_settings, error))
        return ok("chain", f"{chain_where(chain_settings)}: {len(metagraph.neurons)} neurons")

    def check_s3(self) -> CheckResult:
        from common.storage import ObjectStore, StorageError

        s3: S3Settings = self.get(S3Settings)
        store = ObjectStore.from_settings(
            s3, connect_timeout_s=S3_TIMEOUT_S, read_timeout_s=S3_TIMEOUT_S, attempts=1
        )
        try:
            store.ensure_bucket()
        except StorageError as error:
            return fail("s3", s3_failure_message(s3, error, error.status))
        return ok("s3", f"bucket {s3.bucket!r} at {s3.endpoint_url or 'AWS S3'} is ready")

    def check_state(self) -> CheckResult:
        from orchestrator.settings import OrchestratorSettings

        return state_path_result(self.get(OrchestratorSettings).state_path)


def run_checks(role: Role, emit: Callable[[CheckResult], None] | None = None) -> CheckReport:
    """Run `role`'s checks, handing each result to `emit` as it completes."""
    preflight = Preflight(role)
    results = []
    for result in preflight.run():
        results.append(result)
        if emit is not None:
            emit(result)
    return CheckReport(
        role=role, ok=not any(r.fatal for r in results), env_file=preflight.env_file, checks=results
    )
