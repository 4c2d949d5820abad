"""Settings: .env.example documents every setting with its true default, and bad values are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from common.config import ALL_SETTINGS as COMMON_SETTINGS
from common.config import AuthSettings, ChainSettings, ModelSettings, S3Settings
from miner.settings import MinerSettings
from orchestrator.settings import OrchestratorSettings
from validator.settings import ValidatorSettings

# The shared groups plus each role's own; `common` cannot import the roles, the test can.
ALL_SETTINGS = (*COMMON_SETTINGS, OrchestratorSettings, MinerSettings, ValidatorSettings)

EXAMPLE = Path(__file__).resolve().parents[1] / ".env.example"


def _example_entries() -> dict[str, str]:
    entries = {}
    for line in EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Z0-9_]+)=(.*)$", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def _env_names(settings_cls: type) -> list[str]:
    prefix = settings_cls.model_config["env_prefix"]
    return [f"{prefix}{name}".upper() for name in settings_cls.model_fields]


def test_env_example_lists_every_setting_and_nothing_else() -> None:
    documented = set(_example_entries())
    expected = {name for cls in ALL_SETTINGS for name in _env_names(cls)}
    assert documented == expected


@pytest.mark.parametrize("settings_cls", ALL_SETTINGS, ids=lambda c: c.__name__)
def test_env_example_values_are_the_defaults(
    settings_cls: type, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in _env_names(settings_cls):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    from_example = settings_cls(_env_file=EXAMPLE)
    defaults = settings_cls(_env_file=None)
    assert from_example.model_dump() == defaults.model_dump()


def test_environment_overrides_and_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTA_CHAIN_BACKEND", "bittensor")
    monkeypatch.setenv("IOTA_S3_PRESIGN_EXPIRY_S", "60")
    assert ChainSettings(_env_file=None).backend == "bittensor"
    assert S3Settings(_env_file=None).presign_expiry_s == 60
    monkeypatch.setenv("IOTA_CHAIN_BACKEND", "ethereum")
    with pytest.raises(ValidationError):
        ChainSettings(_env_file=None)
    monkeypatch.setenv("IOTA_AUTH_FRESHNESS_WINDOW_MS", "5")
    with pytest.raises(ValidationError):
        AuthSettings(_env_file=None)
    monkeypatch.setenv("IOTA_MODEL_BOTTLENECK_RATIO", "0")
    with pytest.raises(ValidationError):
        ModelSettings(_env_file=None)
