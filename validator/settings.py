"""The validator's own settings (`IOTA_VALIDATOR_`). Wallet, chain and data settings come from
`common.config`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from common.config import settings_config


class ValidatorSettings(BaseSettings):
    model_config = settings_config("IOTA_VALIDATOR_")

    orchestrator_url: str = Field("http://127.0.0.1:8000", description="Base URL of the orchestrator.")
    device: str = Field("auto", description="Where replays run: `auto` (CUDA if available), `cpu`, `cuda`.")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 keeps torch's default.")
    poll_wait_s: float = Field(
        5.0, ge=0, le=60, description="How long to wait for a replay task per request."
    )
    http_timeout_s: float = Field(30.0, gt=0, description="Timeout of one request to the orchestrator.")
    retry_for_s: float = Field(
        120.0, gt=0, description="How long to keep retrying the orchestrator or S3 before giving up."
    )
    weights_interval_s: float = Field(
        1200.0, gt=0, description="How often scores are recomputed and weights set on the chain."
    )
    score_window_epochs: int = Field(8, ge=1, description="Epochs whose work counts towards a score.")
    score_decay: float = Field(
        0.8, gt=0, le=1, description="An epoch k epochs before the latest counts decay**k of its work."
    )
    partition_weight: float = Field(
        1.0, ge=0, description="Work units a reduced partition earns (one forward or backward item is 1)."
    )
    burn_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of the weights set on the burn uid (the subnet owner's)."
    )
    burn_uid: int = Field(0, ge=0, description="The uid that receives the burn share.")
    clasp_records: int = Field(
        4096, ge=16, description="How many of the latest loss records CLASP estimates miners' effects from."
    )
    report_file: Path | None = Field(
        None, description="Write the latest scores and weights (JSON) to this file after each round."
    )
    metrics_port: int = Field(
        9200,
        ge=0,
        le=65535,
        description="Port of this validator's Prometheus /metrics (0: no metrics server).",
    )
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics server listens on; 0.0.0.0 to let other machines scrape.",
    )
    status_interval_s: float = Field(
        30.0, ge=0, description="How often the validator logs a one-line status (0: never)."
    )
