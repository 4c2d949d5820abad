"""`iota export --format hf`: the run's merged model as a transformers checkpoint directory.

The directory holds what `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` need, offline: config.json (an `IotaConfig`, with `auto_map`), the
modeling code, model.safetensors, generation_config.json, the tokenizer, and a README.md model card.
(AutoTokenizer reads config.json first, so it too wants `trust_remote_code=True`, or it asks.)

The modeling code is not a second copy of the model: it is `common/model/modeling_iota.py` and every module
of that package it imports (relatively), copied byte for byte, so that the remote code is exactly the code
that trained the run. The weights come from the bucket through the same hash-checked path as the plain
export (`read_manifest`, `assemble_state`), and everything is written to a staging directory that replaces
DIR only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.checkpoints import manifest_key
from common.data import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer
from common.model import ModelConfig, stage_sizes
from common.protocol import CheckpointManifest
from common.storage import ObjectStore
from iota.export import ExportError, ExportInfo, assemble_state, read_manifest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# ByteTokenizer's special ids by name; "<eos>" is one of the end-of-text names common.hf_data looks for,
# so the exported tokenizer.json also loads as a training tokenizer with the same EOS.
BYTE_SPECIALS = {
    "bos_token": ("<bos>", ByteTokenizer.BOS),
    "eos_token": ("<eos>", ByteTokenizer.EOS),
    "pad_token": ("<pad>", ByteTokenizer.PAD),
}
# Encoded by the exported tokenizer and by the run's own before writing: they must agree on it.
PROBE_TEXT = "def main(argv):\n    return {'héllo': [1, 2.5]}  # ünïcode ✓\n"


def export_hf(store: ObjectStore, run_id: str, out: Path) -> ExportInfo:
    """Write the run's latest merged model to the directory `out` as a transformers checkpoint."""
    _check_installed()
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from common.model.configuration_iota import IotaConfig

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; --format hf writes a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_hf_export(out):
        raise ExportError(f"{out} is a non-empty directory that is not an earlier `iota export --format hf`")
    manifest = read_manifest(store, run_id)
    cfg = ModelConfig.from_dict(manifest.model)
    tokenizer = _run_tokenizer(manifest.data.tokenizer, cfg)
    hf_tokenizer = _hf_tokenizer(manifest.data.tokenizer, tokenizer, cfg)
    state, versions = assemble_state(store, manifest)

    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        code = _copy_model_code(staging)
        bos = getattr(tokenizer, "BOS", tokenizer.EOS)  # as `iota sample`: an empty prompt starts here
        pad = getattr(tokenizer, "PAD", tokenizer.EOS)
        config = IotaConfig(
            iota_model=manifest.model,
            seed=manifest.seed,
            iota_run=_run_facts(manifest, versions),
            architectures=["IotaForCausalLM"],
            auto_map={
                "AutoConfig": "configuration_iota.IotaConfig",
                "AutoModelForCausalLM": "modeling_iota.IotaForCausalLM",
            },
            bos_token_id=bos,
            eos_token_id=tokenizer.EOS,
            pad_token_id=pad,
        )
        config.save_pretrained(staging)
        # The vocabulary is padded past the tokenizer's ids; those were never targets, so generate never
        # picks them (as `iota sample` never does).
        padding_ids = list(range(tokenizer.vocab_size, cfg.vocab_size))
        GenerationConfig(
            bos_token_id=bos,
            eos_token_id=tokenizer.EOS,
            pad_token_id=pad,
            suppress_tokens=padding_ids or None,
        ).save_pretrained(staging)
        save_file(
            {f"model.{name}": tensor for name, tensor in state.items()},
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
        hf_tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(manifest, versions, tokenizer, code))
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportInfo(
        path=out,
        config_path=out / "config.json",
        run_id=manifest.run_id,
        epoch=manifest.epoch,
        parameters=sum(t.numel() for t in state.values()),
        versions=versions,
    )


def _check_installed() -> None:
    """transformers and tokenizers come with the `hf` extra, which the base install lacks."""
    try:
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        raise ExportError(
            f"--format hf needs transformers and tokenizers ({error}); run: pip install -e '.[hf]'"
        ) from None


def _is_hf_export(path: Path) -> bool:
    """Whether `path` holds an earlier HF export (which a new one may replace)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "iota"
    except (OSError, ValueError, AttributeError):
        return False


def _run_tokenizer(name: str, cfg: ModelConfig) -> Tokenizer:
    try:
        tokenizer = load_tokenizer(name)
        check_vocab(tokenizer, cfg.vocab_size)
    except (ImportError, OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"cannot use the run's tokenizer {name!r}: {error}") from None
    return tokenizer


def _hf_tokenizer(name: str, tokenizer: Tokenizer, cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """The run's tokenizer as a transformers tokenizer, refused unless it encodes `PROBE_TEXT` exactly as
    the run's own does (without special tokens, as the corpus encodes every document)."""
    if isinstance(tokenizer, ByteTokenizer):
        hf_tokenizer = _byte_tokenizer()
    else:
        hf_tokenizer = _hub_tokenizer(name, tokenizer)
    hf_tokenizer.model_max_length = cfg.max_seq_len
    got = hf_tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    if got != tokenizer.encode(PROBE_TEXT) or len(hf_tokenizer) != tokenizer.vocab_size:
        raise ExportError(
            f"the run's tokenizer {name!r} does not become a transformers tokenizer that encodes as it does"
        )
    return hf_tokenizer


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """`ByteTokenizer` in `tokenizers` form: byte-level BPE with no merges, so every byte is its own id."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # Byte-level pre-tokenising maps each byte to a printable character (GPT-2's table); the id is the byte.
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    for text, _ in sorted(BYTE_SPECIALS.values(), key=lambda special: special[1]):
        raw.add_special_tokens([AddedToken(text, special=True, normalized=False)])
    # ByteTokenizer reads "<eos>" in a text as five bytes: so must this one (split_special_tokens).
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        split_special_tokens=True,
        **{role: text for role, (text, _) in BYTE_SPECIALS.items()},
    )
    for role, (text, token_id) in BYTE_SPECIALS.items():
        if hf_tokenizer.convert_tokens_to_ids(text) != token_id:
            raise ExportError(f"the byte tokenizer's {role} {text} did not get id {token_id}")
    return hf_tokenizer


def _hub_tokenizer(name: str, tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer with its own files (special tokens, chat template) where transformers can
    load it by `name`; else (a bare tokenizer.json) the `tokenizers` object the run trained with."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError):
        raw = getattr(tokenizer, "_tokenizer", None)  # HFTokenizer's `tokenizers.Tokenizer`
        if raw is None:
            raise ExportError(f"transformers cannot load the run's tokenizer {name!r}") from None
        return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=raw.id_to_token(tokenizer.EOS))
    if hf_tokenizer.eos_token is None:  # a folder holding a bare tokenizer.json names no special tokens
        hf_tokenizer.eos_token = hf_tokenizer.convert_ids_to_tokens(tokenizer.EOS)
    return hf_tokenizer


def _copy_model_code(folder: Path) -> list[str]:
    """modeling_iota.py and everything it imports from its package, verbatim (the one copy of the model)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from common.model import modeling_iota

    source = Path(modeling_iota.__file__)
    paths = sorted({source, *map(Path, get_relative_import_files(str(source)))})
    for path in paths:
        if path.parent != source.parent:
            raise ExportError(f"the modeling code imports {path}, outside {source.parent}")
        shutil.copyfile(path, folder / path.name)
    return [path.name for path in paths]


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished staging directory to `out`; an earlier export there is replaced only now."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def _run_facts(manifest: CheckpointManifest, versions: list[int]) -> dict[str, Any]:
    return {
        "run_id": manifest.run_id,
        "epoch": manifest.epoch,
        "versions": versions,
        "data": manifest.data.model_dump(),
    }


def model_card(
    manifest: CheckpointManifest, versions: list[int], tokenizer: Tokenizer, code: list[str]
) -> str:
    """README.md: the run and the architecture, from the manifest and the config alone. It states no
    measured figure (loss, speed): the export knows none."""
    cfg = ModelConfig.from_dict(manifest.model)
    sizes = stage_sizes(cfg)
    data = manifest.data
    rows = []
    for size, version, ckpt in zip(sizes, versions, manifest.stages, strict=True):
        origin = (
            f"v{version}, weights sha256 `{ckpt.weights.sha256}`" if ckpt else "seeded init (never merged)"
        )
        rows.append(f"| {size.stage} | {size.role} | {size.blocks} | {size.parameters:,} | {origin} |")
    if cfg.has_bottleneck:
        b = cfg.bottleneck_dim
        boundary = (
            f"Each stage boundary is a bottleneck: the sending stage's encoder compresses the "
            f"{cfg.d_model}-wide residual stream to {b} channels (d_model / {cfg.bottleneck_ratio}; its "
            f"first {b} residual channels pass straight through), and the receiving stage's decoder "
            "expands them back."
        )
        if cfg.stage_tokens:
            projected = f", projected to {cfg.d_model}" if cfg.token_dim < cfg.d_model else ""
            boundary += (
                f" Every stage after the first also embeds the token ids itself (width {cfg.token_dim}"
                f"{projected}) and adds them to its decoded input."
            )
    else:
        boundary = "The stages hand the whole residual stream on (bottleneck ratio 1: no bottleneck)."
    if isinstance(tokenizer, ByteTokenizer):
        tokenizer_text = "the byte-level tokenizer (UTF-8 bytes as ids 0-255, then BOS, EOS, PAD)"
    else:
        tokenizer_text = f"`{data.tokenizer}`"
    architecture = (
        f"Preset `{cfg.name}`: a Llama-style decoder (pre-norm blocks with RMSNorm, rotary position "
        f"embeddings with theta {cfg.rope_theta:g}, grouped-query attention with {cfg.n_heads} heads and "
        f"{cfg.n_kv_heads} key-value heads, SwiGLU feed-forward of width {cfg.ffn_hidden}), d_model "
        f"{cfg.d_model}, {cfg.n_layers} blocks, context {cfg.max_seq_len} tokens, vocabulary "
        f"{cfg.vocab_size}, untied LM head; {sum(size.parameters for size in sizes):,} parameters. It was "
        f"trained as {cfg.n_stages} pipeline stages on separate machines. {boundary}"
    )
    data_text = (
        f"Corpus source `{data.source}` (fingerprint `{data.fingerprint}`), tokenizer {tokenizer_text}, "
        f"training sequences of {data.seq_len} tokens in batches of {data.batch_size}. Each document was "
        f"encoded without the tokenizer's special tokens and ended with EOS (id {tokenizer.EOS})."
    )
    remote = (
        f"`trust_remote_code` runs {', '.join(f'`{name}`' for name in code)} from this folder: the project's "
        "own model code (`common/model/`), copied unchanged. The model has no KV cache (each generated token "
        "recomputes the context), does not support padding (an attention mask must be all ones), and takes "
        f"at most {cfg.max_seq_len} tokens of context."
    )
    intro = (
        f"Exported by `iota export --format hf` from the run's checkpoint manifest "
        f"(`{manifest_key(manifest.run_id)}`) after {manifest.epoch} completed epochs; every checkpoint "
        "object was checked against the size and sha256 the manifest records. This card states only what "
        "the manifest records: no evaluation."
    )
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- iota
- pipeline-parallel
---

# IOTA run `{manifest.run_id}`, epoch {manifest.epoch}

{_wrap(intro)}

## Architecture

{_wrap(architecture)}

| stage | role | blocks | parameters | checkpoint |
| --- | --- | --- | --- | --- |
{chr(10).join(rows)}

Initialisation seed {manifest.seed} (a stage never merged is that seeded initialisation).

## Data

{_wrap(data_text)}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)
ids = tokenizer("def main(", add_special_tokens=False, return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, do_sample=False, max_new_tokens=50)[0]))
```

{_wrap(remote)}
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=110, break_long_words=False, break_on_hyphens=False)
