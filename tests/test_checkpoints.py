"""common/checkpoints.py: a stored stage state is read only as announced, whoever wrote the bucket.

A miner, the orchestrator and `iota export` all load checkpoints through `fetch_state`; an object that a
hostile writer swapped, inflated or filled with non-finite values must be refused before it becomes weights.
"""

from __future__ import annotations

import pytest
import torch

from common.checkpoints import CheckpointError, fetch_state, stage_shapes, start_weights
from common.codec import content_hash
from common.merge import encode_state
from common.model import get_preset
from common.protocol import ArtifactRef

CFG = get_preset("tiny")
SHAPES = stage_shapes(CFG, 1)


def _ref(data: bytes, key: str = "run/ckpt/stage-1/v3/weights") -> ArtifactRef:
    return ArtifactRef(key=key, size=len(data), sha256=content_hash(data))


def test_the_announced_state_round_trips() -> None:
    weights = start_weights(CFG, 1, seed=0)
    data = encode_state(weights)
    state = fetch_state(lambda _: data, _ref(data), SHAPES)
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


def test_an_object_claiming_more_than_the_stage_holds_is_refused_before_any_download() -> None:
    data = encode_state(start_weights(CFG, 1, seed=0))
    huge = ArtifactRef(key="run/ckpt/huge", size=64 * 2**30, sha256=content_hash(data))
    fetched: list[ArtifactRef] = []
    with pytest.raises(CheckpointError, match="more than the stage can take"):
        fetch_state(lambda r: fetched.append(r) or data, huge, SHAPES)
    assert fetched == []


def test_bytes_swapped_after_the_announcement_are_refused() -> None:
    honest = encode_state(start_weights(CFG, 1, seed=0))
    forged = encode_state(start_weights(CFG, 1, seed=1))  # same size, other weights
    assert len(forged) == len(honest)
    with pytest.raises(CheckpointError, match="not the .* bytes and sha256 announced"):
        fetch_state(lambda _: forged, _ref(honest), SHAPES)
    with pytest.raises(CheckpointError, match="missing"):
        fetch_state(lambda _: None, _ref(honest), SHAPES)


def test_announced_bytes_that_are_not_finite_weights_are_refused() -> None:
    weights = start_weights(CFG, 1, seed=0)
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    data = encode_state(weights)  # announced honestly, but not weights a stage may load
    with pytest.raises(CheckpointError, match="not the stage's weights"):
        fetch_state(lambda _: data, _ref(data), SHAPES)
