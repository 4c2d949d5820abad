"""Hugging Face datasets as a corpus: a sample id is (data file, row), and its tokens run on from that row.

Every machine that resolves the same files rebuilds the same tokens: Hub files come pinned to the commit
they were resolved at, and the fingerprint covers the file list, each file's row count and the tokenizer.
Parquet rows are read by row group straight from the file (range requests on the Hub), so reaching row N
costs one row group rather than N rows; JSON-lines and text files are streamed with `datasets` and skipped
to the row.

Needs the `hf` extra (`datasets`, `tokenizers`, `pyarrow`); `common.data` imports this module only when a
setting asks for it, so the base install runs without them.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import fsspec
import pyarrow.parquet as pq
import tokenizers
import torch

from common.data import SampleId, Tokenizer, check_sample

# File suffix -> the `datasets` builder that reads it. JSON files must be JSON lines (one object a line).
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # JSON lines and text may be compressed; parquet is inside
# Tried in order for the id that ends each document: SentencePiece, GPT-2/NeoX/Qwen, Llama 3, Gemma.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
_MAGIC = re.compile(r"[*?\[]")


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind the `Tokenizer` protocol.

    Documents are encoded without the tokenizer's own special tokens (no BOS or template), because the
    corpus puts exactly one EOS after every row itself. The fingerprint hashes the serialised tokenizer,
    so the same vocabulary loaded from different paths or names agrees.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, name: str) -> None:
        self._tokenizer, self.name = tokenizer, name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = next((i for t in EOS_TOKENS if (i := tokenizer.token_to_id(t)) is not None), None)
        if eos is None:
            raise ValueError(f"tokenizer {name!r} has none of the end-of-text tokens {', '.join(EOS_TOKENS)}")
        self.EOS: int = eos
        self.fingerprint = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """A local tokenizer.json (or a folder holding one), else a tokenizer on the Hugging Face Hub."""
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)), name)
    if path.suffix == ".json" or name.startswith((".", "/", "~")):
        raise ValueError(f"no tokenizer file at {path}")
    return HFTokenizer(tokenizers.Tokenizer.from_pretrained(name), name)


@dataclass
class DataFile:
    """One shard: where to read it, how the fingerprint names it, and its rows."""

    path: str  # a local path or an fsspec URL (hf://datasets/<repo>@<commit>/<file>)
    label: str  # machine-independent: a path relative to the dataset folder plus its size, or the URL
    builder: str
    rows: int = 0
    parquet: pq.FileMetaData | None = field(default=None, repr=False)


def builder_for(path: str) -> str:
    """The `datasets` builder of a data file, from its name; unsupported kinds are refused."""
    name = path.lower()
    for compression in COMPRESSIONS:
        name = name.removesuffix(compression)
    builder = BUILDERS.get(Path(name).suffix)
    if builder is None or (builder == "parquet" and name != path.lower()):
        raise ValueError(f"unsupported data file {path}: use {', '.join(BUILDERS)} files")
    return builder


def list_data_files(
    dataset: str, *, config: str | None, split: str, data_files: str | None
) -> list[DataFile]:
    """The corpus's files, sorted.

    An absolute `data_files` glob is taken as it is (config and split then play no part); otherwise
    `datasets` resolves the split's files of a Hub repo or a local folder, `data_files` relative to it.
    """
    if data_files is not None and Path(data_files).expanduser().is_absolute():
        pattern = str(Path(data_files).expanduser())
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        base = Path(os.path.abspath(_glob_base(pattern)))
    else:
        paths = resolve_with_datasets(dataset, config=config, split=split, data_files=data_files)
        folder = Path(dataset).expanduser()
        base = Path(os.path.abspath(folder)) if folder.is_dir() else None
    if not paths:
        where = data_files if data_files is not None else f"{dataset} (config {config}, split {split})"
        raise ValueError(f"no data files in {where}")
    return [DataFile(path=p, label=_label(p, base), builder=builder_for(p)) for p in paths]


def resolve_with_datasets(
    dataset: str, *, config: str | None, split: str, data_files: str | None
) -> list[str]:
    """The split's files as `datasets` resolves them: a Hub repo id (needs the network) or a local folder.

    Hub files come back as hf:// URLs pinned to the repo's current commit, so that all processes that
    resolve them at once read identical bytes, and a later push to the repo changes the fingerprint.
    """
    builder = datasets.load_dataset_builder(dataset, config, data_files=data_files)
    resolved = builder.config.data_files or {}
    if split not in resolved:
        splits = ", ".join(map(str, resolved)) or "none"
        raise ValueError(f"{dataset} has no split {split!r}; it has {splits}")
    return sorted(str(p) for p in resolved[split])


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    static = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    base = Path(*parts[:static])
    return base.parent if static == len(parts) else base  # no wildcard: the pattern names one file


def _label(path: str, base: Path | None) -> str:
    if base is None:  # a URL; its commit pins the content
        return path
    local = Path(os.path.abspath(path))  # not resolve(): a symlinked file keeps its name in the folder
    return f"{local.relative_to(base).as_posix()}:{local.stat().st_size}"


def _count_rows(file: DataFile, text_field: str) -> None:
    if file.builder == "parquet":
        with fsspec.open(file.path, "rb") as handle:
            file.parquet = pq.ParquetFile(handle).metadata
        if text_field not in file.parquet.schema.names:
            raise ValueError(f"{file.path} has no column {text_field!r}")
        file.rows = file.parquet.num_rows
        return
    # Counted by the same reader that later serves the rows, so the two can never disagree.
    rows = 0
    for table in _stream(file).with_format("arrow").iter(batch_size=65_536):
        if text_field not in table.column_names:
            raise ValueError(f"{file.path} has no field {text_field!r}")
        rows += table.num_rows
    file.rows = rows


def _stream(file: DataFile) -> Any:
    return datasets.load_dataset(file.builder, data_files=[file.path], split="train", streaming=True)


class HFStreamingCorpus:
    """A Hugging Face dataset's data files as a corpus: shard = file, offset = row, unit = row.

    A sample's tokens are its row's text encoded, then EOS, then the following rows likewise, running
    on into the next files (wrapping round at the end) until `seq_len` tokens, like `LocalTextCorpus`.
    Row counts are read once at construction: parquet footers only; JSON lines and text files in full.
    """

    def __init__(
        self,
        dataset: str,
        *,
        config: str | None = None,
        split: str = "train",
        text_field: str = "text",
        data_files: str | None = None,
        tokenizer: Tokenizer,
    ) -> None:
        for name, value in (("dataset", dataset), ("split", split), ("text_field", text_field)):
            if not value.strip():
                raise ValueError(f"{name} must not be empty")
        self.dataset, self.config, self.split, self.text_field = dataset, config, split, text_field
        self.tokenizer = tokenizer
        self._files = list_data_files(dataset, config=config, split=split, data_files=data_files)
        # Parquet footers in threads, because on the Hub each is a round trip. The other formats go through
        # `datasets`, whose tqdm progress bars are not safe to start from several threads at once.
        parquet = [f for f in self._files if f.builder == "parquet"]
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda f: _count_rows(f, text_field), parquet))
        for file in self._files:
            if file.builder != "parquet":
                _count_rows(file, text_field)
        self._starts = [0]
        for file in self._files:
            self._starts.append(self._starts[-1] + file.rows)
        if not self.total_tokens:
            raise ValueError(f"the data files of {dataset} hold no rows")

    @property
    def num_shards(self) -> int:
        return len(self._files)

    @property
    def total_tokens(self) -> int:
        """Rows in all files: the unit of this corpus is a row, not a token."""
        return self._starts[-1]

    @property
    def files(self) -> list[str]:
        return [file.path for file in self._files]

    def shard_size(self, shard: int) -> int:
        """Rows in a shard."""
        return self._files[self._check_shard(shard)].rows

    @cached_property
    def fingerprint(self) -> str:
        # A local folder's own path differs between machines; its files' relative labels identify it.
        name = "" if Path(self.dataset).expanduser().is_dir() else self.dataset
        digest = hashlib.sha256(
            f"hf:{name}:{self.config}:{self.split}:{self.text_field}:{self.tokenizer.fingerprint}\n".encode()
        )
        for file in self._files:
            digest.update(f"{file.label}:{file.rows}\n".encode())
        return digest.hexdigest()

    def tokens(self, sample: SampleId, seq_len: int) -> torch.Tensor:
        """The `seq_len` int64 tokens of `sample`, identical on every machine that holds this corpus."""
        check_sample(self, sample, seq_len, unit="rows")
        out: list[int] = []
        shard, offset = sample.shard, sample.offset
        while len(out) < seq_len:
            for text in self._texts(shard, offset):
                out.extend(self.tokenizer.encode(text))
                out.append(self.tokenizer.EOS)
                if len(out) >= seq_len:
                    break
            shard, offset = (shard + 1) % self.num_shards, 0
        return torch.tensor(out[:seq_len], dtype=torch.long)

    def locate(self, position: int) -> SampleId:
        """The sample id of a row of the whole dataset (0 <= position < total_tokens)."""
        if not 0 <= position < self.total_tokens:
            raise ValueError(f"position {position} is outside the corpus (0..{self.total_tokens - 1})")
        shard = bisect.bisect_right(self._starts, position) - 1
        return SampleId(shard=shard, offset=position - self._starts[shard])

    def _texts(self, shard: int, offset: int) -> Iterator[str]:
        file = self._files[shard]
        rows = self._parquet_texts(file, offset) if file.parquet else self._streamed_texts(file, offset)
        for row, text in enumerate(rows, start=offset):
            if not isinstance(text, str):
                raise ValueError(f"row {row} of {file.path} has no text in {self.text_field!r}: {text!r}")
            yield text

    def _parquet_texts(self, file: DataFile, offset: int) -> Iterator[Any]:
        meta = file.parquet
        assert meta is not None
        group_starts = [0]
        for group in range(meta.num_row_groups):
            group_starts.append(group_starts[-1] + meta.row_group(group).num_rows)
        group = bisect.bisect_right(group_starts, offset) - 1
        skip = offset - group_starts[group]
        with fsspec.open(file.path, "rb") as handle:
            reader = pq.ParquetFile(handle, metadata=meta)
            for index in range(group, meta.num_row_groups):
                column = reader.read_row_group(index, columns=[self.text_field]).column(0)
                # Row by row: a sample usually needs a row or two of a group that may hold thousands.
                for row in range(skip, len(column)):
                    yield column[row].as_py()
                skip = 0

    def _streamed_texts(self, file: DataFile, offset: int) -> Iterator[Any]:
        for row in _stream(file).skip(offset):
            yield row.get(self.text_field)

    def _check_shard(self, shard: int) -> int:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} is out of range (corpus has {self.num_shards} shards)")
        return shard
