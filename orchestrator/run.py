"""What a run is (`RunSpec`: model, data, training settings, seed), made from the settings, and the run
opened in the state file: created on first start, refused if the file belongs to a run of other settings."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.config import DataSettings, ModelSettings
from common.data import Corpus
from common.model import ModelConfig, get_preset
from common.model.config import split_blocks
from common.protocol import DataSpec, TrainingSpec
from orchestrator.db import StateDB
from orchestrator.settings import OrchestratorSettings, training_spec


class RunMismatch(RuntimeError):
    """The state file belongs to a run with other settings; refuse rather than silently mix two runs."""


@dataclass(frozen=True)
class RunSpec:
    """What a run is; fixed at creation and checked on every restart."""

    model: ModelConfig
    data: DataSpec
    training: TrainingSpec
    seed: int

    def as_json(self) -> dict[str, object]:
        return {
            "model": self.model.to_dict(),
            "data": self.data.model_dump(),
            "training": self.training.model_dump(),
            "seed": self.seed,
        }


def run_spec(
    settings: OrchestratorSettings, model: ModelSettings, data: DataSettings, corpus: Corpus
) -> RunSpec:
    overrides: dict[str, object] = {}
    if model.bottleneck_ratio:
        overrides["bottleneck_ratio"] = model.bottleneck_ratio
    cfg = get_preset(model.preset, **overrides)
    if model.stages:
        cfg = cfg.with_overrides(stage_blocks=split_blocks(cfg.n_layers, model.stages))
    if data.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {data.seq_len} exceeds the preset's max_seq_len {cfg.max_seq_len}")
    if corpus.tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {corpus.tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    return RunSpec(
        model=cfg,
        data=DataSpec(
            source=data.source,
            fingerprint=corpus.fingerprint,
            tokenizer=data.tokenizer,
            batch_size=data.batch_size,
            seq_len=data.seq_len,
        ),
        training=training_spec(settings),
        seed=model.seed,
    )


def open_run(db: StateDB, spec: RunSpec, clock: Callable[[], float] = time.time) -> str:
    """The run id stored in `db`, creating the run on first start; refuses a state file of another run."""
    run_id = db.get_meta("run_id")
    if run_id is None:
        run_id = time.strftime("run-%Y%m%d-%H%M%S-", time.gmtime(clock())) + secrets.token_hex(3)
        with db.transaction():
            db.set_meta("run_id", run_id)
            db.set_meta("spec", spec.as_json())
            db.set_meta("started_at", clock())
        return str(run_id)
    stored = db.get_meta("spec")
    if stored != spec.as_json():
        raise RunMismatch(
            f"{db.path} holds run {run_id}, created with other settings (model, data or training). "
            "Start it with the same settings, or point IOTA_ORCH_STATE_PATH at a new file for a new run."
        )
    return str(run_id)


__all__ = ["RunMismatch", "RunSpec", "open_run", "run_spec"]
