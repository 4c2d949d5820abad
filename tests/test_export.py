"""`iota export` and `iota sample` against an embedded S3 server holding a checkpoint written by hand, the way
the orchestrator writes one after a merge: stage 1 merged (perturbed weights), stages 0 and 2 never merged."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from common.checkpoints import manifest_key
from common.codec import content_hash
from common.data import ByteTokenizer, load_tokenizer
from common.merge import encode_state
from common.model import get_preset
from common.model.stages import IotaModel, build_stage
from common.protocol import ArtifactRef, CheckpointManifest, DataSpec, StageCheckpoint
from common.s3server import EmbeddedS3
from common.storage import ObjectStore
from iota.cli import app
from iota.export import ExportError, export_model, generate, generate_ids, load_exported, read_manifest
from iota.hf_export import export_hf
from orchestrator.db import StateDB
from tests.bpe_tokenizer import train_tokenizer

BUCKET = "test-export"
SEED = 7
CFG = get_preset("tiny")
ROOT = Path(__file__).resolve().parents[1]


def put(store: ObjectStore, key: str, data: bytes) -> ArtifactRef:
    store.put_bytes(key, data)
    return ArtifactRef(key=key, size=len(data), sha256=content_hash(data))


def publish_run(store: ObjectStore, run_id: str, tokenizer: str = "byte") -> dict[str, torch.Tensor]:
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
        data=DataSpec(source="local", fingerprint="x", tokenizer=tokenizer, batch_size=2, seq_len=32),
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


# ---------------------------------------------------------------------------------------------------------
# --format hf: a transformers checkpoint directory, loaded back through transformers' own Auto classes.

PROMPT = "def main(argv):\n    return "
# transformers copies remote code to ~/.cache/huggingface/modules/<folder name>/<hash of the code>: a folder
# name per xdist worker keeps two workers from writing the same files at once, and reruns from piling up.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="module")
def hf_export(store: ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run exported both ways: (the --format hf directory, the safetensors file)."""
    publish_run(store, "run-hf")
    folder = tmp_path_factory.mktemp("hf")
    out = folder / f"iota-hf-{WORKER}"
    info = export_hf(store, "run-hf", out)
    assert info.path == out and info.versions == [0, 3, 0]
    weights = folder / "model.safetensors"
    export_model(store, "run-hf", weights)
    return out, weights


@pytest.fixture(scope="module")
def hf_model(hf_export: tuple[Path, Path]) -> Any:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        hf_export[0], trust_remote_code=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def test_hf_export_ships_the_model_code_verbatim_and_loads_with_our_logits(
    hf_export: tuple[Path, Path], hf_model: Any
) -> None:
    out, weights = hf_export
    shipped = sorted(p.name for p in out.glob("*.py"))
    assert shipped == ["config.py", "configuration_iota.py", "layers.py", "modeling_iota.py", "stages.py"]
    for name in shipped:
        assert (out / name).read_bytes() == (ROOT / "common" / "model" / name).read_bytes()
    assert not list(out.parent.glob(f".{out.name}.*")), "the staging directory was left behind"

    ours, _ = load_exported(weights)
    ids = torch.tensor([ByteTokenizer().encode(PROMPT), ByteTokenizer().encode(PROMPT[::-1])])
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, ours(ids))


def test_hf_greedy_generate_gives_the_same_tokens_as_iota_sample(
    hf_export: tuple[Path, Path], hf_model: Any
) -> None:
    ours, _ = load_exported(hf_export[1])
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(PROMPT)
    expected = generate_ids(
        ours,
        ids,
        max_new_tokens=12,
        temperature=0,
        top_k=None,
        seed=0,
        vocab=tokenizer.vocab_size,
        eos=tokenizer.EOS,
    )
    out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12)[0, len(ids) :].tolist()
    got = out[: out.index(tokenizer.EOS)] if tokenizer.EOS in out else out
    assert got == expected and got


def test_hf_tokenizer_encodes_as_the_byte_tokenizer(hf_export: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    out = hf_export[0]
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    ours = ByteTokenizer()
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        256,
        257,
        258,
    )
    for text in (PROMPT, "héllo wörld ✓ 🐍", "a literal <eos> is text", ""):
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf_tokenizer.decode(ours.encode(text)) == text
    # The same tokenizer.json also serves as a training tokenizer, with the same EOS.
    again = load_tokenizer(str(out))
    assert again.EOS == ours.EOS and again.encode(PROMPT) == ours.encode(PROMPT)


def test_hf_model_card_and_config_name_the_run(store: ObjectStore, hf_export: tuple[Path, Path]) -> None:
    out = hf_export[0]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "iota" and config["iota_model"] == CFG.to_dict()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_iota.IotaForCausalLM"
    assert config["iota_run"]["run_id"] == "run-hf" and config["iota_run"]["epoch"] == 4
    assert config["iota_run"]["versions"] == [0, 3, 0]
    card = (out / "README.md").read_text()
    assert "# IOTA run `run-hf`, epoch 4" in card and "Preset `tiny`" in card
    parameters = sum(p.numel() for p in IotaModel(CFG, device="meta").parameters())
    assert f"{parameters:,} parameters" in card
    ckpt = read_manifest(store, "run-hf").stages[1]
    assert ckpt is not None and f"v3, weights sha256 `{ckpt.weights.sha256}`" in card
    assert card.count("seeded init (never merged)") == 2


def test_hf_export_refuses_a_foreign_directory_and_a_tampered_checkpoint(
    store: ObjectStore, tmp_path: Path
) -> None:
    publish_run(store, "run-hf-refused")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier"):
        export_hf(store, "run-hf-refused", foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    ref = read_manifest(store, "run-hf-refused").stages[1]
    assert ref is not None
    store.put_bytes(ref.weights.key, b"not the weights")
    out = tmp_path / "hf"
    with pytest.raises(ExportError, match=ref.weights.key):
        export_hf(store, "run-hf-refused", out)
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))


def test_hf_export_saves_a_hugging_face_tokenizer_that_encodes_as_the_run_did(
    store: ObjectStore, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    # The folder (not the file): transformers' AutoTokenizer loads it, the way it loads a Hub tokenizer.
    path = train_tokenizer(tmp_path / "tok").parent
    publish_run(store, "run-hf-bpe", tokenizer=str(path))
    out = tmp_path / f"iota-hf-bpe-{WORKER}"
    export_hf(store, "run-hf-bpe", out)
    ours = load_tokenizer(str(path))
    hf_tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    text = "the quick gamma fox, héllo"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf_tokenizer.eos_token_id == ours.EOS
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == list(range(ours.vocab_size, CFG.vocab_size))


def test_cli_exports_the_hf_format_to_a_directory(s3: EmbeddedS3, store: ObjectStore, tmp_path: Path) -> None:
    publish_run(store, "run-cli-hf")
    env = {"IOTA_S3_ENDPOINT_URL": s3.endpoint_url, "IOTA_S3_BUCKET": BUCKET}
    out = tmp_path / "model-hf"
    args = ["export", "--format", "hf", "--out", str(out), "--run", "run-cli-hf"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "run-cli-hf" in result.output and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["iota_run"]["run_id"] == "run-cli-hf"
    # A file where the directory should go is refused, and left alone.
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, [*args[:4], str(blocker), *args[5:]], env=env)
    assert result.exit_code == 2 and "is a file" in result.output and blocker.read_text() == "x"
