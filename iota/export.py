"""`iota export` and `iota sample`: the trained model out of the bucket, into one file, and text out of it.

The orchestrator rewrites a `CheckpointManifest` after every epoch's merges; it names each stage's latest
checkpoint (or None: the stage was never merged and still holds its seeded init). Export needs nothing but
the bucket: it checks every object against the size and hash the manifest recorded, assembles the stages into
the state dict of one `IotaModel`, and writes it as safetensors with a JSON config beside it. Sampling loads
that pair back without pickle, so an exported file from anyone is safe to open.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.checkpoints import CheckpointError, manifest_key, read_state, stage_shapes, start_weights
from common.data import Tokenizer
from common.model import ModelConfig
from common.model.stages import IotaModel
from common.protocol import ArtifactRef, CheckpointManifest
from common.storage import ObjectStore, StorageError

# A manifest is a few hundred bytes per stage; anything near this is not one, so refuse before reading it.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class ExportError(RuntimeError):
    """Export or loading cannot go on; the message says what to do about it."""


@dataclass(frozen=True)
class ExportInfo:
    """What `export_model` wrote, for the CLI to report."""

    path: Path
    config_path: Path
    run_id: str
    epoch: int
    parameters: int
    versions: list[int]


def config_path_for(weights: Path) -> Path:
    """The JSON config that travels with an exported weights file: same name, `.json` suffix."""
    return weights.with_suffix(".json")


def read_manifest(store: ObjectStore, run_id: str) -> CheckpointManifest:
    """The run's latest checkpoint manifest; an ExportError if there is none yet (no merge has finished)."""
    key = manifest_key(run_id)
    try:
        data = store.get_bytes(key, max_bytes=MAX_MANIFEST_BYTES)
    except StorageError as error:
        if error.status == 404:
            raise ExportError(
                f"no checkpoint manifest at {key} in bucket {store.bucket}: no merge has completed yet in "
                f"run {run_id} (or the run id or the bucket is wrong)"
            ) from None
        raise ExportError(f"cannot read the checkpoint manifest {key}: {error}") from error
    try:
        manifest = CheckpointManifest.model_validate_json(data)
    except ValueError as error:
        raise ExportError(f"{key} is not a valid checkpoint manifest: {error}") from error
    if manifest.run_id != run_id:
        raise ExportError(f"{key} belongs to run {manifest.run_id}, not {run_id}")
    return manifest


def fetch_stage_weights(
    store: ObjectStore, ref: ArtifactRef, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """A stage's checkpointed weights, refused unless the object is exactly what the manifest recorded:
    the bucket is shared, so size and hash are what tie the bytes to the orchestrator's merge."""
    try:
        return read_state(store, ref, shapes)
    except StorageError as error:
        raise ExportError(f"cannot read checkpoint object {ref.key}: {error}") from error
    except CheckpointError as error:
        raise ExportError(str(error)) from error


def assemble_state(
    store: ObjectStore, manifest: CheckpointManifest
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The whole model's state dict (`stages.{s}.{name}`) and each stage's version (0: seeded init)."""
    cfg = ModelConfig.from_dict(manifest.model)
    if len(manifest.stages) != cfg.n_stages:
        raise ExportError(f"the manifest lists {len(manifest.stages)} stages; the model has {cfg.n_stages}")
    state: dict[str, torch.Tensor] = {}
    versions: list[int] = []
    for s, ckpt in enumerate(manifest.stages):
        if ckpt is None:
            # Never merged: every replica still starts from this exact seeded init, so it is the stage.
            weights = start_weights(cfg, s, manifest.seed)
            versions.append(0)
        else:
            if ckpt.stage != s:
                raise ExportError(f"the manifest's entry {s} is a checkpoint of stage {ckpt.stage}")
            weights = fetch_stage_weights(store, ckpt.weights, stage_shapes(cfg, s))
            versions.append(ckpt.version)
        for name, tensor in weights.items():
            state[f"stages.{s}.{name}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    check_state(cfg, state)
    return state, versions


def check_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict whose names or shapes differ from `IotaModel(cfg)`'s, before writing anything."""
    expected = {name: tuple(t.shape) for name, t in IotaModel(cfg, device="meta").state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if missing := sorted(expected.keys() - got.keys()):
        raise ExportError(f"the assembled weights lack {len(missing)} tensors, e.g. {missing[0]}")
    if extra := sorted(got.keys() - expected.keys()):
        raise ExportError(f"the assembled weights have {len(extra)} unexpected tensors, e.g. {extra[0]}")
    for name, shape in expected.items():
        if got[name] != shape:
            raise ExportError(f"{name} has shape {got[name]}; the model needs {shape}")


def export_model(store: ObjectStore, run_id: str, out: Path) -> ExportInfo:
    """Write the run's latest merged model to `out` (safetensors) and its config to `out` with `.json`."""
    from safetensors.torch import save_file

    out = Path(out)
    config_path = config_path_for(out)
    if config_path == out:
        raise ExportError(f"{out} would be overwritten by its own config; name it e.g. model.safetensors")
    manifest = read_manifest(store, run_id)
    state, versions = assemble_state(store, manifest)
    config: dict[str, Any] = {
        "model": manifest.model,
        "run_id": manifest.run_id,
        "epoch": manifest.epoch,
        "seed": manifest.seed,
        "versions": versions,
        "tokenizer": manifest.data.tokenizer,
        "seq_len": manifest.data.seq_len,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so that an interrupted export never leaves a half-written file
    # that `load_exported` would later trip over.
    tmp_weights, tmp_config = (
        out.with_name(out.name + ".tmp"),
        config_path.with_name(config_path.name + ".tmp"),
    )
    save_file(state, str(tmp_weights), metadata={"format": "pt"})
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, out)
    os.replace(tmp_config, config_path)
    return ExportInfo(
        path=out,
        config_path=config_path,
        run_id=manifest.run_id,
        epoch=manifest.epoch,
        parameters=sum(t.numel() for t in state.values()),
        versions=versions,
    )


def load_exported(path: Path) -> tuple[IotaModel, dict[str, Any]]:
    """An exported model in eval mode on the CPU, and its config; safetensors only, never unpickled."""
    from safetensors.torch import load_file

    path = Path(path)
    config_path = config_path_for(path)
    if not path.is_file():
        raise ExportError(f"no exported weights at {path}")
    if not config_path.is_file():
        raise ExportError(f"no config beside {path} (expected {config_path}, written by `iota export`)")
    config: dict[str, Any] = json.loads(config_path.read_text())
    # Built on the CPU rather than on meta: the rotary tables are buffers that the file does not carry.
    model = IotaModel(ModelConfig.from_dict(config["model"]))
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise ExportError(f"{path} does not fit the model in {config_path}: {error}") from error
    model.eval()
    return model, config


@torch.no_grad()
def generate(
    model: IotaModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    """The continuation of `prompt` (without the prompt itself), sampled token by token (`generate_ids`).

    An empty prompt starts from BOS if the tokenizer has one, else from EOS, which ends every training
    document and so reads as "a new document starts here".
    """
    ids = tokenizer.encode(prompt) or [getattr(tokenizer, "BOS", tokenizer.EOS)]
    new = generate_ids(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        vocab=tokenizer.vocab_size,
        eos=tokenizer.EOS,
    )
    return tokenizer.decode(new)


@torch.no_grad()
def generate_ids(
    model: IotaModel,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    vocab: int,
    eos: int,
) -> list[int]:
    """The token ids that follow `ids`, picked among the first `vocab` ids, up to (not including) `eos`.

    No KV cache: the model is small enough for export-time sampling and the stages have none. The context
    is cropped to the model's `max_seq_len`. Temperature 0 is greedy; `top_k` None or 0 keeps every token.
    """
    if max_new_tokens < 0 or not math.isfinite(temperature) or temperature < 0:
        raise ValueError("max_new_tokens and temperature must be non-negative")
    if not ids:
        raise ValueError("generation needs at least one token to start from")
    cfg = model.cfg
    device = next(model.parameters()).device
    # The model's vocabulary is padded past the tokenizer's; those ids were never targets, so never pick them.
    vocab = min(vocab, cfg.vocab_size)
    ids = list(ids)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-cfg.max_seq_len :]], dtype=torch.long, device=device)
        logits = model(context)[0, -1, :vocab].float().cpu()
        token = _pick(logits, temperature, top_k, generator)
        if token == eos:
            break
        ids.append(token)
        new.append(token)
    return new


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from a 1-D logit vector: argmax at temperature 0, else a draw from the top-k softmax."""
    if temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if top_k and top_k < scaled.numel():
        threshold = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
