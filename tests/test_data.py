"""Sample ids: every process rebuilds the same tokens, splits are fixed, bad ids are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.data import ByteTokenizer, LocalTextCorpus, SampleId, SampleSchedule, stdlib_source_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stdlib() -> LocalTextCorpus:
    return LocalTextCorpus(stdlib_source_dir())


@pytest.fixture()
def small(tmp_path: Path) -> LocalTextCorpus:
    (tmp_path / "a.py").write_bytes(b"abc")
    (tmp_path / "b.py").write_bytes(b"defgh")
    (tmp_path / "notes.txt").write_bytes(b"ignored")
    return LocalTextCorpus(tmp_path)


def test_samples_run_on_across_files_with_eos_and_wrap_round(small: LocalTextCorpus) -> None:
    eos = ByteTokenizer.EOS
    assert small.num_shards == 2 and small.total_tokens == 3 + 1 + 5 + 1
    assert small.tokens(SampleId(shard=0, offset=1), 6).tolist() == [*b"bc", eos, *b"def"]
    assert small.tokens(SampleId(shard=1, offset=3), 5).tolist() == [*b"gh", eos, *b"ab"]
    assert small.locate(4) == SampleId(shard=1, offset=0)


def test_bad_sample_ids_are_refused(small: LocalTextCorpus) -> None:
    with pytest.raises(ValueError, match="out of range"):
        small.tokens(SampleId(shard=2, offset=0), 4)
    with pytest.raises(ValueError, match="past the end"):
        small.tokens(SampleId(shard=0, offset=4), 4)
    with pytest.raises(ValueError):
        SampleId(shard=-1, offset=0)
    with pytest.raises(ValueError, match="at least 2"):
        small.tokens(SampleId(shard=0, offset=0), 1)


def test_the_stdlib_corpus_and_schedule_are_the_same_in_another_process(stdlib: LocalTextCorpus) -> None:
    schedule = SampleSchedule(stdlib, seed=5)
    ids = [schedule.sample(i) for i in range(20)]
    script = (
        "import sys\n"
        "from common.data import LocalTextCorpus, SampleSchedule, stdlib_source_dir\n"
        "c = LocalTextCorpus(stdlib_source_dir()); s = SampleSchedule(c, seed=5)\n"
        "print(c.fingerprint)\n"
        "for i in range(20):\n"
        "    sample = s.sample(i); print(sample.shard, sample.offset, c.tokens(sample, 64).sum().item())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True)
    lines = out.stdout.split("\n")
    assert lines[0] == stdlib.fingerprint
    assert lines[1:21] == [f"{s.shard} {s.offset} {stdlib.tokens(s, 64).sum().item()}" for s in ids]


def test_schedule_keeps_heldout_shards_out_of_training(stdlib: LocalTextCorpus) -> None:
    schedule = SampleSchedule(stdlib, seed=0, heldout_per_mille=50)
    train = [schedule.sample(i) for i in range(300)]
    heldout = [schedule.sample(i, "heldout") for i in range(30)]
    assert all(schedule.split_of(s.shard) == "train" for s in train)
    assert all(schedule.split_of(s.shard) == "heldout" for s in heldout)
    assert {s.shard for s in train}.isdisjoint({s.shard for s in heldout})
    assert len({s.shard for s in train}) > 200  # spread over the corpus, not stuck in a few files
    assert SampleSchedule(stdlib, seed=1).sample(0) != SampleSchedule(stdlib, seed=0).sample(0)
    with pytest.raises(ValueError, match="no heldout shards"):
        SampleSchedule(stdlib, seed=0, heldout_per_mille=0).sample(0, "heldout")


def test_byte_tokens_fit_the_tiny_vocabulary_and_decode(stdlib: LocalTextCorpus) -> None:
    from common.model import get_preset

    tokens = stdlib.tokens(SampleSchedule(stdlib, seed=0).sample(0), 256)
    assert tokens.dtype == torch.long and tokens.shape == (256,)
    assert int(tokens.max()) < ByteTokenizer.vocab_size <= get_preset("tiny").vocab_size
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
