"""Training data addressed by sample ids, so that miners never choose what they train on.

The orchestrator hands out `SampleId`s from a seeded `SampleSchedule`; the head miner, the tail miner and the
validators each rebuild the exact same tokens from the id with `Corpus.tokens`. Token tensors sent by a
miner are therefore never trusted: whoever needs the tokens rebuilds them.

The offline corpus is a folder of text files (by default the Python standard library's own sources, present
on every machine) read as bytes with a byte-level tokenizer. The production corpus is a Hugging Face dataset
streamed file by file (`common.hf_data`, needs the `hf` extra); `make_corpus` picks one from settings.
"""

from __future__ import annotations

import bisect
import hashlib
import sysconfig
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from common.config import DataSettings

Split = Literal["train", "heldout"]


class Tokenizer(Protocol):
    """Text to token ids and back; `EOS` ends every document, and `fingerprint` names the vocabulary."""

    EOS: int
    vocab_size: int
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Bytes 0-255 as themselves, plus BOS, EOS and PAD; fits the `tiny` preset's 320-entry vocabulary."""

    BOS, EOS, PAD = 256, 257, 258
    vocab_size = 259
    fingerprint = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SampleId(BaseModel):
    """Where a sample starts: a shard (a file of the corpus) and a unit inside it (a byte or a row)."""

    model_config = ConfigDict(frozen=True)

    shard: int = Field(ge=0)
    offset: int = Field(ge=0)


class Corpus(Protocol):
    """What the schedule and the miners need of a data source.

    The stream is cut into shards (files), each holding `shard_size(shard)` units; a sample id points at a
    unit and its tokens run on from there. The unit is a token (a byte) for `LocalTextCorpus` and a row
    (a document) for `HFStreamingCorpus`, so `total_tokens` counts units, not necessarily tokens.
    """

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def num_shards(self) -> int: ...

    @property
    def total_tokens(self) -> int: ...

    def shard_size(self, shard: int) -> int: ...

    def locate(self, position: int) -> SampleId: ...

    def tokens(self, sample: SampleId, seq_len: int) -> torch.Tensor: ...


def check_sample(corpus: Corpus, sample: SampleId, seq_len: int, *, unit: str) -> None:
    """Refuse a sample id that does not point into `corpus`, or a sequence too short to train on."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2 (an input and a target)")
    if sample.offset >= corpus.shard_size(sample.shard):
        raise ValueError(
            f"offset {sample.offset} is past the end of shard {sample.shard} "
            f"({corpus.shard_size(sample.shard)} {unit})"
        )


def stdlib_source_dir() -> Path:
    """The running Python's standard-library folder: the devnet's default corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


class LocalTextCorpus:
    """Text files under `root` matching `pattern`, read as one byte stream with EOS between files.

    A sample is the `seq_len` tokens that start at (file, offset) and run on into the following files
    (wrapping round at the end), so every sample is full length and needs no padding. Files are listed in
    sorted order and the listing is fingerprinted, so that processes can check they hold the same corpus.
    """

    def __init__(
        self, root: Path | str, pattern: str = "**/*.py", exclude: Sequence[str] = ("site-packages",)
    ) -> None:
        self.root = Path(root)
        files = sorted(
            p
            for p in self.root.glob(pattern)
            if p.is_file() and not set(p.relative_to(self.root).parts) & set(exclude)
        )
        if not files:
            raise ValueError(f"no files match {pattern!r} under {self.root}")
        self._files = files
        # Each file contributes its bytes and one EOS; sizes come from stat, contents are read on demand.
        self._sizes = [p.stat().st_size + 1 for p in files]
        self._starts = [0]
        for size in self._sizes:
            self._starts.append(self._starts[-1] + size)
        self.tokenizer = ByteTokenizer()

    @property
    def num_shards(self) -> int:
        return len(self._files)

    @property
    def total_tokens(self) -> int:
        """Bytes plus one EOS per file: here every unit is a token."""
        return self._starts[-1]

    def shard_size(self, shard: int) -> int:
        """Tokens in a shard: its bytes plus the EOS that ends it."""
        return self._sizes[self._check_shard(shard)]

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path, size in zip(self._files, self._sizes, strict=True):
            digest.update(f"{path.relative_to(self.root).as_posix()}:{size}\n".encode())
        return digest.hexdigest()

    def tokens(self, sample: SampleId, seq_len: int) -> torch.Tensor:
        """The `seq_len` int64 tokens of `sample`, identical on every machine that holds this corpus."""
        check_sample(self, sample, seq_len, unit="tokens")
        out: list[int] = []
        shard, offset = sample.shard, sample.offset
        while len(out) < seq_len:
            out.extend(self._read(shard, offset, seq_len - len(out)))
            shard, offset = (shard + 1) % self.num_shards, 0
        return torch.tensor(out, dtype=torch.long)

    def _read(self, shard: int, offset: int, count: int) -> list[int]:
        with self._files[shard].open("rb") as handle:
            handle.seek(offset)
            data = list(handle.read(count))
        if len(data) < count:
            data.append(ByteTokenizer.EOS)
        return data

    def locate(self, position: int) -> SampleId:
        """The sample id of a position in the whole stream (0 <= position < total_tokens)."""
        if not 0 <= position < self.total_tokens:
            raise ValueError(f"position {position} is outside the corpus (0..{self.total_tokens - 1})")
        shard = bisect.bisect_right(self._starts, position) - 1
        return SampleId(shard=shard, offset=position - self._starts[shard])

    def _check_shard(self, shard: int) -> int:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is out of range (corpus has {self.num_shards} shards)")
        return shard


def shard_split(fingerprint: str, shard: int, heldout_per_mille: int) -> Split:
    """Which split a shard belongs to: a fixed hash of (corpus, shard), so it never moves between runs."""
    digest = hashlib.sha256(f"{fingerprint}:{shard}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "little") % 1000 < heldout_per_mille else "train"


class SampleSchedule:
    """The run's sequence of sample ids: the `index`-th sample is a pure function of (seed, corpus, index).

    Positions are drawn uniformly over the corpus stream from a hash of (seed, index), and samples whose
    shard is held out are skipped, so the orchestrator can hand out, requeue or recount any index and
    every process agrees on what it means.
    """

    def __init__(self, corpus: Corpus, seed: int, heldout_per_mille: int = 20) -> None:
        if not 0 <= heldout_per_mille < 1000:
            raise ValueError("heldout_per_mille must be in [0, 1000)")
        self.corpus, self.seed, self.heldout_per_mille = corpus, seed, heldout_per_mille
        heldout = sum(self.split_of(s) == "heldout" for s in range(corpus.num_shards))
        self.shards_per_split: dict[Split, int] = {"train": corpus.num_shards - heldout, "heldout": heldout}
        if heldout == corpus.num_shards:
            raise ValueError("every shard is held out; lower heldout_per_mille or use a larger corpus")

    def split_of(self, shard: int) -> Split:
        return shard_split(self.corpus.fingerprint, shard, self.heldout_per_mille)

    def sample(self, index: int, split: Split = "train") -> SampleId:
        if index < 0:
            raise ValueError("sample index must be non-negative")
        if not self.shards_per_split[split]:
            raise ValueError(
                f"the corpus has no {split} shards at heldout_per_mille={self.heldout_per_mille}"
            )
        attempt = 0
        while True:
            digest = hashlib.sha256(f"{self.seed}:{split}:{index}:{attempt}".encode()).digest()
            sample = self.corpus.locate(int.from_bytes(digest[:8], "little") % self.corpus.total_tokens)
            if self.split_of(sample.shard) == split:
                return sample
            attempt += 1

    def batch(self, index: int, batch_size: int, split: Split = "train") -> list[SampleId]:
        """The sequences of the network's sample `index`: schedule entries index*B .. index*B + B-1."""
        return [self.sample(index * batch_size + j, split) for j in range(batch_size)]


def batch_tokens(corpus: Corpus, samples: Sequence[SampleId], seq_len: int) -> torch.Tensor:
    """The (len(samples), seq_len) int64 batch of `samples`, one row each."""
    if not samples:
        raise ValueError("a batch needs at least one sample")
    return torch.stack([corpus.tokens(sample, seq_len) for sample in samples])


def load_tokenizer(name: str) -> Tokenizer:
    """`byte` for `ByteTokenizer`; else a Hugging Face tokenizer by local path or Hub name (`hf` extra)."""
    if name == "byte":
        return ByteTokenizer()
    return _hf_data().load_hf_tokenizer(name)


def _hf_data() -> ModuleType:
    # Imported on demand: the base install has neither `datasets` nor `tokenizers`.
    try:
        from common import hf_data
    except ImportError as error:
        raise ImportError(
            f"Hugging Face data and tokenizers need the hf extra ({error}); run: pip install -e '.[hf]'"
        ) from error
    return hf_data


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has ids."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has only {vocab_size}; "
            "choose a larger model preset or a smaller tokenizer"
        )


def make_corpus(settings: DataSettings) -> Corpus:
    """The corpus that `settings` describe; every process with equal settings gets the same fingerprint."""
    if settings.source == "local":
        if settings.tokenizer != "byte":
            raise ValueError(
                f"the local corpus is read as bytes, so it needs tokenizer=byte, not {settings.tokenizer!r}; "
                "use source=hf (with a local folder or data files) for another tokenizer"
            )
        return LocalTextCorpus(settings.local_root or stdlib_source_dir(), settings.local_pattern)
    return _hf_data().HFStreamingCorpus(
        settings.hf_dataset,
        config=settings.hf_config,
        split=settings.hf_split,
        text_field=settings.hf_text_field,
        data_files=settings.hf_data_files,
        tokenizer=load_tokenizer(settings.tokenizer),
    )
