"""A small byte-level BPE tokenizer trained here, saved as a Hugging Face `tokenizer.json`: a real
tokenizer for the tests of the Hugging Face corpus (test_hf_data) and export (test_export), with no
download."""

from __future__ import annotations

from pathlib import Path

import pytest


def train_tokenizer(folder: Path, special: str = "<|endoftext|>") -> Path:
    """`folder/tokenizer.json`, a 300-token vocabulary with `special` as its only special token."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(["alpha beta gamma delta", "the quick brown fox"] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"
