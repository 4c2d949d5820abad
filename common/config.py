"""Settings, read from the environment and `.env` by pydantic-settings.

Each group has its own prefix (IOTA_S3_, IOTA_CHAIN_, ...) and is documented field by field in
`.env.example`; a test keeps the two in step. Daemons compose the groups they need.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def env_file() -> str:
    """The settings file: IOTA_ENV_FILE (which the start scripts also read), else `.env`."""
    return os.environ.get("IOTA_ENV_FILE") or ".env"


def settings_config(prefix: str) -> SettingsConfigDict:
    """The `model_config` of every settings group here and of each role's own (`miner/settings.py`, ...):
    variables under `prefix`, read from the environment and then the settings file."""
    # Empty values in .env mean "use the default", so .env.example can list optional settings blank.
    return SettingsConfigDict(env_prefix=prefix, env_file=env_file(), env_ignore_empty=True, extra="ignore")


class WalletSettings(BaseSettings):
    """The bittensor wallet whose hotkey signs this process's requests."""

    model_config = settings_config("IOTA_WALLET_")

    name: str = Field("default", description="Wallet (coldkey) name under the wallets path.")
    hotkey: str = Field("default", description="Hotkey name inside the wallet.")
    path: Path = Field(Path("~/.bittensor/wallets"), description="Folder that holds the wallets.")

    @field_validator("path")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()


class ChainSettings(BaseSettings):
    """Which chain supplies identities and receives weights."""

    model_config = settings_config("IOTA_CHAIN_")

    backend: Literal["local", "bittensor"] = Field(
        "local", description="`local`: a file-backed chain for devnet and tests; `bittensor`: the real chain."
    )
    netuid: int = Field(9, ge=0, description="Subnet uid.")
    network: str = Field(
        "finney", description="bittensor network name or websocket endpoint (backend=bittensor)."
    )
    metagraph_ttl_s: float = Field(
        60.0, gt=0, description="How long a metagraph read from the bittensor chain is reused, in seconds."
    )
    local_path: Path = Field(
        Path(".iota/chain.json"), description="State file of the local chain (backend=local)."
    )
    local_block_time_s: float = Field(
        12.0, gt=0, description="Seconds per block on the local chain (backend=local)."
    )


# The embedded S3 server accepts any credentials; boto3 only needs non-empty ones to sign.
LOCAL_S3_ACCESS_KEY_ID = "iota-local"
LOCAL_S3_SECRET_ACCESS_KEY = "iota-local-secret"


class S3Settings(BaseSettings):
    """The bucket that carries activations, gradients, weights and checkpoints."""

    model_config = settings_config("IOTA_S3_")

    endpoint_url: str | None = Field(
        None, description="S3 endpoint; empty means AWS S3. Use the R2 or MinIO URL for those stores."
    )
    region: str = Field("us-east-1", description="Region name used for signing (`auto` for R2).")
    bucket: str = Field("iota", description="Bucket name; created on start-up if it does not exist.")
    access_key_id: SecretStr = Field(SecretStr(LOCAL_S3_ACCESS_KEY_ID), description="Access key id.")
    secret_access_key: SecretStr = Field(
        SecretStr(LOCAL_S3_SECRET_ACCESS_KEY), description="Secret access key."
    )
    presign_expiry_s: int = Field(
        900, ge=1, le=7 * 24 * 3600, description="Lifetime of presigned URLs, in seconds."
    )
    multipart_part_mb: int = Field(
        64, ge=5, le=5 * 1024, description="Part size for multipart uploads, in MiB (S3 minimum is 5)."
    )
    max_object_mb: int = Field(
        8 * 1024, ge=1, description="Largest object the network accepts or downloads, in MiB."
    )


class AuthSettings(BaseSettings):
    """Epistula request signing and verification."""

    model_config = settings_config("IOTA_AUTH_")

    freshness_window_ms: int = Field(
        10_000, ge=100, description="How far a request's timestamp may be from now, either way, in ms."
    )
    replay_cache_size: int = Field(
        1_000_000, ge=1_000, description="Most request UUIDs remembered at once to reject replays."
    )
    max_body_bytes: int = Field(
        1_048_576, ge=1_024, description="Largest signed request body accepted, in bytes."
    )
    # Per verified hotkey, after the signature and the replay cache: forged or replayed requests never spend
    # anyone's budget, and one hotkey's flood never slows another. Miners long-poll: they make few requests.
    rate_per_s: float = Field(
        50.0, ge=0, description="Requests per second each hotkey may make on average (0: no limit)."
    )
    rate_burst: int = Field(
        200, ge=1, description="Requests a hotkey may make at once, above the average rate, before a 429."
    )


class ModelSettings(BaseSettings):
    """Which model the run trains."""

    model_config = settings_config("IOTA_MODEL_")

    preset: str = Field("tiny", description="Model preset: tiny, 100m, 1.5b or 15b.")
    bottleneck_ratio: int | None = Field(
        None, ge=1, description="d_model / b at stage boundaries; empty keeps the preset's default."
    )
    seed: int = Field(0, description="Seed of the identical initialisation every replica starts from.")
    stages: int | None = Field(
        None, ge=2, description="Split the preset's blocks into this many stages; empty keeps its split."
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        from common.model.config import PRESETS  # lazily: the model package imports torch

        if value not in PRESETS:
            raise ValueError(f"unknown preset '{value}'; choose one of {', '.join(PRESETS)}")
        return value


class DataSettings(BaseSettings):
    """What a sample is: the corpus that sample ids index, its tokenizer and the batch shape."""

    model_config = settings_config("IOTA_DATA_")

    source: Literal["local", "hf"] = Field(
        "local", description="`local`: text files read as bytes; `hf`: a Hugging Face dataset, streamed."
    )
    local_root: Path | None = Field(
        None, description="Folder of the local corpus; empty means the Python standard library's sources."
    )
    local_pattern: str = Field("**/*.py", description="Glob of the local corpus's files under its folder.")
    hf_dataset: str = Field(
        "HuggingFaceFW/fineweb-edu", description="Dataset repo id on the Hub, or a local folder (source=hf)."
    )
    hf_config: str | None = Field(None, description="Dataset config (subset); empty means the default one.")
    hf_split: str = Field("train", description="Dataset split whose files make the corpus.")
    hf_text_field: str = Field("text", description="Column holding each row's text.")
    hf_data_files: str | None = Field(
        None,
        description="Glob of data files (parquet, jsonl, txt): relative to the dataset, or an absolute local"
        " glob that replaces it; empty means the config's files for the split.",
    )
    tokenizer: str = Field(
        "byte",
        description="`byte` (bytes as tokens), a Hub tokenizer name, or a local tokenizer.json or folder.",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per sample.")
    seq_len: int = Field(256, ge=2, description="Tokens per sequence.")
    heldout_per_mille: int = Field(
        20, ge=0, lt=1000, description="Shards held out of training for validation, per thousand."
    )


with warnings.catch_warnings():
    # The field is `json` so that its variable is IOTA_LOG_JSON; it shadows BaseModel's deprecated .json().
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class LogSettings(BaseSettings):
        """How every daemon logs; the command line's --json-logs and --log-level win over these."""

        model_config = settings_config("IOTA_LOG_")

        json: bool = Field(  # type: ignore[assignment]
            False, description="One JSON object per line (ts, level, logger, msg) instead of readable lines."
        )
        level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
            "INFO", description="Lowest level logged."
        )

        @field_validator("level", mode="before")
        @classmethod
        def _upper(cls, value: object) -> object:
            return value.upper() if isinstance(value, str) else value


# Every settings group, so that .env.example can be checked against them.
ALL_SETTINGS: tuple[type[BaseSettings], ...] = (
    WalletSettings,
    ChainSettings,
    S3Settings,
    AuthSettings,
    ModelSettings,
    DataSettings,
    LogSettings,
)
