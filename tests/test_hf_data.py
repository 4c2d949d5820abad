"""The Hugging Face corpus, offline: local parquet, JSON-lines and text files, a tokenizer trained here."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
tokenizers = pytest.importorskip("tokenizers")

from common.config import DataSettings  # noqa: E402
from common.data import (  # noqa: E402
    ByteTokenizer,
    LocalTextCorpus,
    SampleId,
    SampleSchedule,
    Tokenizer,
    batch_tokens,
    check_vocab,
    load_tokenizer,
    make_corpus,
)
from common.hf_data import HFStreamingCorpus, HFTokenizer, list_data_files  # noqa: E402
from tests.bpe_tokenizer import train_tokenizer  # noqa: E402

JSONL_ROWS = ["alpha", "beta gamma"]
PARQUET_ROWS = [f"p{i}" for i in range(7)]
TEXT_ROWS = ["x1", "", "x3"]
ROWS = JSONL_ROWS + PARQUET_ROWS + TEXT_ROWS  # in file order: a.jsonl, b.parquet, c.txt
EOS = ByteTokenizer.EOS


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test here may reach the Hub: the libraries read these flags at import, so patch both."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _write_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # A blank line is not a row of a JSON-lines file; the row counts must agree with the reader.
    lines = [json.dumps({"text": text, "n": i}) for i, text in enumerate(JSONL_ROWS)]
    (folder / "a.jsonl").write_text("\n\n".join(lines))
    table = pa.table({"id": list(range(len(PARQUET_ROWS))), "text": PARQUET_ROWS})
    pq.write_table(table, folder / "b.parquet", row_group_size=3)  # rows cross row groups too
    (folder / "c.txt").write_text("\n".join(TEXT_ROWS) + "\n")
    return folder


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write_files(tmp_path / "data")


def _corpus(folder: Path, tokenizer: Tokenizer | None = None) -> HFStreamingCorpus:
    return HFStreamingCorpus(
        "local-test", data_files=str(folder / "*"), tokenizer=tokenizer or ByteTokenizer()
    )


def _expected(position: int, seq_len: int, tokenizer: Tokenizer | None = None) -> list[int]:
    """The rows from `position` on, each encoded and followed by EOS, wrapping round: what tokens() gives."""
    tokenizer = tokenizer or ByteTokenizer()
    stream: list[int] = []
    while len(stream) < seq_len:
        for text in ROWS[position:]:
            stream += [*tokenizer.encode(text), tokenizer.EOS]
        position = 0
    return stream[:seq_len]


def test_files_are_listed_in_order_with_their_row_counts(data: Path) -> None:
    corpus = _corpus(data)
    assert [Path(p).name for p in corpus.files] == ["a.jsonl", "b.parquet", "c.txt"]
    assert [corpus.shard_size(s) for s in range(corpus.num_shards)] == [2, 7, 3]
    assert corpus.total_tokens == len(ROWS)
    assert corpus.locate(2) == SampleId(shard=1, offset=0)
    assert corpus.locate(11) == SampleId(shard=2, offset=2)


@pytest.mark.parametrize(
    ("shard", "offset", "seq_len"),
    [
        (0, 1, 20),  # a JSON row, then on into the parquet file
        (1, 2, 12),  # across the parquet file's row groups
        (2, 1, 40),  # the text file's empty line, then wrapping round to the first file
    ],
)
def test_tokens_run_on_across_rows_and_files(data: Path, shard: int, offset: int, seq_len: int) -> None:
    corpus = _corpus(data)
    position = [0, 2, 9][shard] + offset
    tokens = corpus.tokens(SampleId(shard=shard, offset=offset), seq_len)
    assert tokens.dtype == torch.long and tokens.tolist() == _expected(position, seq_len)


def test_another_instance_rebuilds_the_same_tokens_and_fingerprint(data: Path, tmp_path: Path) -> None:
    first, second = _corpus(data), _corpus(data)
    assert first.fingerprint == second.fingerprint
    for sample in (SampleId(shard=0, offset=0), SampleId(shard=1, offset=5), SampleId(shard=2, offset=0)):
        assert torch.equal(first.tokens(sample, 16), second.tokens(sample, 16))
    # The same files in another folder (another machine) are the same corpus.
    moved = shutil.copytree(data, tmp_path / "elsewhere")
    assert _corpus(moved).fingerprint == first.fingerprint


def test_fingerprint_changes_with_the_data_and_the_tokenizer(data: Path) -> None:
    before = _corpus(data).fingerprint
    with (data / "a.jsonl").open("a") as handle:
        handle.write("\n" + json.dumps({"text": "delta"}))
    changed = _corpus(data)
    assert changed.shard_size(0) == 3 and changed.fingerprint != before

    class OtherTokenizer(ByteTokenizer):
        fingerprint = "other"

    assert _corpus(data, OtherTokenizer()).fingerprint != changed.fingerprint


def test_compressed_json_lines_and_a_local_dataset_folder(tmp_path: Path) -> None:
    folder = tmp_path / "gz"
    folder.mkdir()
    with gzip.open(folder / "rows.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps({"body": t}) for t in ["one", "two", "three"]))
    corpus = HFStreamingCorpus(str(folder), text_field="body", tokenizer=ByteTokenizer())
    assert corpus.num_shards == 1 and corpus.shard_size(0) == 3
    assert corpus.tokens(SampleId(shard=0, offset=1), 7).tolist() == [*b"two", EOS, *b"thr"]


def test_bad_inputs_are_refused(data: Path, tmp_path: Path) -> None:
    corpus = _corpus(data)
    with pytest.raises(ValueError, match="out of range"):
        corpus.tokens(SampleId(shard=3, offset=0), 4)
    with pytest.raises(ValueError, match="past the end"):
        corpus.tokens(SampleId(shard=0, offset=2), 4)
    with pytest.raises(ValueError, match="at least 2"):
        corpus.tokens(SampleId(shard=0, offset=0), 1)
    with pytest.raises(ValueError, match="no column 'body'"):
        HFStreamingCorpus(
            "x", data_files=str(data / "b.parquet"), text_field="body", tokenizer=ByteTokenizer()
        )
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "holes.parquet")
    holes = HFStreamingCorpus("x", data_files=str(tmp_path / "holes.parquet"), tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="row 1 of .* has no text"):
        holes.tokens(SampleId(shard=0, offset=0), 8)
    with pytest.raises(ValueError, match="no data files"):
        HFStreamingCorpus("x", data_files=str(tmp_path / "none" / "*.parquet"), tokenizer=ByteTokenizer())
    with pytest.raises(ValueError, match="must not be empty"):
        HFStreamingCorpus(" ", data_files=str(data / "*"), tokenizer=ByteTokenizer())
    (data / "d.csv").write_text("text\nrow\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        _corpus(data)


def test_a_hub_dataset_is_resolved_through_datasets_and_stays_offline() -> None:
    with pytest.raises(ConnectionError):
        list_data_files("HuggingFaceFW/fineweb-edu", config=None, split="train", data_files=None)


def test_a_tokenizer_trained_here_loads_by_path_and_round_trips(tmp_path: Path, data: Path) -> None:
    path = train_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(str(path))
    assert isinstance(tokenizer, HFTokenizer)
    assert load_tokenizer(str(path.parent)).fingerprint == tokenizer.fingerprint  # the folder works too
    assert tokenizer.EOS == 0 and 256 < tokenizer.vocab_size <= 300
    text = "the quick gamma fox, héllo"
    ids = tokenizer.encode(text)
    assert tokenizer.EOS not in ids and tokenizer.decode(ids) == text
    check_vocab(tokenizer, 320)
    with pytest.raises(ValueError, match="model's vocabulary has only 256"):
        check_vocab(tokenizer, 256)
    with pytest.raises(ValueError, match="model's vocabulary"):
        check_vocab(ByteTokenizer(), 100)

    corpus = _corpus(data, tokenizer)
    assert corpus.fingerprint != _corpus(data).fingerprint
    assert corpus.tokens(SampleId(shard=0, offset=1), 16).tolist() == _expected(1, 16, tokenizer)


def test_bad_tokenizers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="end-of-text"):
        load_tokenizer(str(train_tokenizer(tmp_path / "no-eos", special="<pad>")))
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_make_corpus_builds_either_source_and_schedules_agree(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in DataSettings.model_fields:
        monkeypatch.delenv(f"IOTA_DATA_{name.upper()}", raising=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    local = make_corpus(DataSettings(local_root=tmp_path / "src"))
    assert isinstance(local, LocalTextCorpus) and local.total_tokens == 7
    with pytest.raises(ValueError, match="tokenizer=byte"):
        make_corpus(DataSettings(local_root=tmp_path / "src", tokenizer="gpt2"))

    path = train_tokenizer(tmp_path / "tok")
    settings = DataSettings(source="hf", hf_data_files=str(data / "*"), tokenizer=str(path), seq_len=12)
    first, second = make_corpus(settings), make_corpus(settings)
    assert isinstance(first, HFStreamingCorpus) and first.fingerprint == second.fingerprint
    schedules = [SampleSchedule(c, seed=3, heldout_per_mille=0) for c in (first, second)]
    samples = [schedules[0].sample(i) for i in range(8)]
    assert samples == [schedules[1].sample(i) for i in range(8)]
    assert len(set(samples)) > 1
    batch = batch_tokens(second, samples[: settings.batch_size], settings.seq_len)
    assert batch.shape == (8, 12) and batch.dtype == torch.long
    assert torch.equal(batch[3], first.tokens(samples[3], settings.seq_len))
    with pytest.raises(ValueError, match="at least one sample"):
        batch_tokens(first, [], 12)
