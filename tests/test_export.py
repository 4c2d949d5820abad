"""`iota export` and `iota sample` against an embedded S3 server holding a checkpoint written by hand, the way
the orchestrator writes one after a merge: stage 1 merged (perturbed weights), stages 0 and 2 never merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from common.codec import content_hash
from common.data import ByteTokenizer
from common.merge import encode_state
from common.model import get_preset
from common.model.stages import IotaModel, build_stage
from common.protocol import ArtifactRef, CheckpointManifest, DataSpec, StageCheckpoint, manifest_key
from common.s3server import EmbeddedS3
from common.storage import ObjectStore
from iota.cli import app
from iota.export import ExportError, export_model, generate, load_exported, read_manifest
from orchestrator.db import StateDB

BUCKET = "test-export"
SEED = 7
CFG = get_preset("tiny")


def put(store: ObjectStore, key: str, data: bytes) -> ArtifactRef:
    store.put_bytes(key, data)
    return ArtifactRef(key=key, size=len(data), sha256=content_hash(data))


def publish_run(store: ObjectStore, run_id: str) -> dict[str, torch.Tensor]:
    """Stage 1 at version 3 with perturbed weights; returns those weights."""
    weights = {n: t + 0.01 for n, t in build_stage(CFG, 1, SEED).state_dict().items()}
    momentum = {n: torch.zeros_like(t) for n, t in weights.items()}
    base = f"runs/{run_id}/checkpoints/s1/v3"
    ckpt = StageCheckpoint(
        stage=1,
        version=3,
        weights=put(store, f"{base}/weights", encode_state(weights)),
        momentum=put(store, f"{base}/momentum", encode_state(momentum)),
    )
    manifest = CheckpointManifest(
        run_id=run_id,
        epoch=4,
        model=CFG.to_dict(),
        seed=SEED,
        data=DataSpec(source="local", fingerprint="x", tokenizer="byte", batch_size=2, seq_len=32),
        stages=[None, ckpt, None],
    )
    store.put_bytes(manifest_key(run_id), manifest.model_dump_json().encode())
    return weights


def test_export_assembles_merged_stages_bitwise_and_seeded_init_elsewhere(
    store: ObjectStore, tmp_path: Path
) -> None:
    merged = publish_run(store, "run-ok")
    out = tmp_path / "model.safetensors"
    info = export_model(store, "run-ok", out)

    assert info.versions == [0, 3, 0]
    assert info.parameters == sum(p.numel() for p in IotaModel(CFG, device="meta").parameters())
    tensors = load_file(str(out))
    for name, value in merged.items():
        assert torch.equal(tensors[f"stages.1.{name}"], value)
    for s in (0, 2):
        for name, value in build_stage(CFG, s, SEED).state_dict().items():
            assert torch.equal(tensors[f"stages.{s}.{name}"], value)

    config = json.loads(out.with_suffix(".json").read_text())
    assert config["versions"] == [0, 3, 0]
    assert config["run_id"] == "run-ok" and config["epoch"] == 4
    assert config["tokenizer"] == "byte" and config["seq_len"] == 32
    assert config["model"] == CFG.to_dict()

    model, loaded = load_exported(out)
    assert loaded == config and not model.training
    assert torch.equal(
        model.stages[1].state_dict()["blocks.0.attn.wq.weight"], merged["blocks.0.attn.wq.weight"]
    )


@pytest.mark.parametrize("tamper", ["flip", "truncate"])
def test_a_checkpoint_object_changed_after_the_manifest_is_refused(
    store: ObjectStore, tmp_path: Path, tamper: str
) -> None:
    run_id = f"run-tampered-{tamper}"
    publish_run(store, run_id)
    ref = read_manifest(store, run_id).stages[1]
    assert ref is not None
    data = bytearray(store.get_bytes(ref.weights.key, max_bytes=ref.weights.size))
    if tamper == "flip":
        data[-1] ^= 0x01
    else:
        del data[-4:]
    store.put_bytes(ref.weights.key, bytes(data))

    out = tmp_path / "model.safetensors"
    with pytest.raises(ExportError, match=ref.weights.key):
        export_model(store, run_id, out)
    assert not out.exists()


def test_a_run_without_a_manifest_says_no_merge_has_completed(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no merge has completed"):
        export_model(store, "run-never-merged", tmp_path / "model.safetensors")


def test_greedy_generation_is_deterministic_and_sampling_follows_the_seed() -> None:
    model = IotaModel(CFG, seed=SEED).eval()
    tokenizer = ByteTokenizer()

    def run(prompt: str, temperature: float, seed: int) -> str:
        return generate(
            model, tokenizer, prompt, max_new_tokens=12, temperature=temperature, top_k=50, seed=seed
        )

    assert run("def f(", 0.0, 0) == run("def f(", 0.0, 123)
    assert run("def f(", 1.0, 5) == run("def f(", 1.0, 5)
    assert isinstance(run("", 0.0, 0), str)  # an empty prompt starts from BOS
    # Longer than max_seq_len: the context is cropped rather than refused.
    assert isinstance(
        generate(
            model, tokenizer, "x" * (CFG.max_seq_len + 5), max_new_tokens=2, temperature=0, top_k=None, seed=0
        ),
        str,
    )


def test_cli_exports_by_run_or_state_db_and_samples(
    s3: EmbeddedS3, store: ObjectStore, tmp_path: Path
) -> None:
    publish_run(store, "run-cli")
    env = {"IOTA_S3_ENDPOINT_URL": s3.endpoint_url, "IOTA_S3_BUCKET": BUCKET}
    runner = CliRunner()
    out = tmp_path / "model.safetensors"

    result = runner.invoke(app, ["export", "--out", str(out), "--run", "run-cli"], env=env)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "run-cli" in result.output

    state = tmp_path / "orchestrator.sqlite"
    db = StateDB(state)
    db.set_meta("run_id", "run-cli")
    db.close()
    from_state = tmp_path / "from-state.safetensors"
    result = runner.invoke(app, ["export", "--out", str(from_state), "--state", str(state)], env=env)
    assert result.exit_code == 0, result.output
    assert from_state.read_bytes() == out.read_bytes()

    result = runner.invoke(
        app, ["export", "--out", str(from_state), "--state", str(tmp_path / "none.sqlite")]
    )
    assert result.exit_code == 2 and "--run" in result.output

    result = runner.invoke(
        app,
        ["sample", "--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "16", "--seed", "1"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("import ") and result.output.strip()
