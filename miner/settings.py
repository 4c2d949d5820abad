"""The miner's own settings (`IOTA_MINER_`). Wallet and data settings come from `common.config`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from common.config import settings_config
from miner.behaviors import Behavior


class MinerSettings(BaseSettings):
    model_config = settings_config("IOTA_MINER_")

    orchestrator_url: str = Field("http://127.0.0.1:8000", description="Base URL of the orchestrator.")
    device: str = Field("auto", description="`auto` (CUDA if available), `cpu`, `cuda` or `cuda:N`.")
    require_gpu: bool = Field(
        False, description="Refuse to start (`iota check miner` fails) when device=auto finds no CUDA GPU."
    )
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default.")
    poll_wait_s: float = Field(5.0, ge=0, le=60, description="How long to wait for work per request.")
    http_timeout_s: float = Field(30.0, gt=0, description="Timeout of one request to the orchestrator.")
    retry_for_s: float = Field(
        120.0, gt=0, description="How long to keep retrying the orchestrator or S3 before giving up an item."
    )
    timings_file: Path | None = Field(
        None, description="Write where the miner's time goes (JSON) to this file every few seconds."
    )
    snapshot_file: Path | None = Field(
        None, description="Write this stage's current weights (safetensors) to this file when stopping."
    )
    stage: int | None = Field(
        None,
        ge=0,
        description="Stage to ask for when first joining (say, the smallest that fits your GPU); empty lets"
        " the orchestrator balance. It may still move you later to a starving stage.",
    )
    behavior: Behavior = Field(
        "honest", description="Deliberate misbehaviour, for tests and the devnet only. Keep `honest`."
    )
    metrics_port: int = Field(
        9100, ge=0, le=65535, description="Port of this miner's Prometheus /metrics (0: no metrics server)."
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics server listens on; 0.0.0.0 to let other machines scrape.",
    )
    status_interval_s: float = Field(
        30.0, ge=0, description="How often the miner logs a one-line status (0: never)."
    )
