"""Merge arithmetic: partitions, reducer plans, the robust weighted mean and the outer Nesterov step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from common.merge import (
    assign_reducers,
    flatten,
    nesterov_step,
    partitions,
    robust_weighted_mean,
    unflatten,
)
from common.model import build_stage, get_preset


def test_flatten_round_trips_a_stage_and_partitions_cover_it_exactly() -> None:
    weights = build_stage(get_preset("tiny"), 1, seed=3).state_dict()
    flat = flatten(weights)
    back = unflatten(flat, weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)
    parts = partitions(flat.numel(), 7)
    assert parts[0].start == 0 and parts[-1].end == flat.numel()
    assert all(a.end == b.start for a, b in zip(parts, parts[1:], strict=False))
    assert max(p.numel for p in parts) - min(p.numel for p in parts) <= 1
    with pytest.raises(ValueError):
        unflatten(flat[:-1], weights)


@pytest.mark.parametrize("members", [2, 3, 4, 7])
def test_every_partition_gets_two_distinct_reducers_and_the_load_is_even(members: int) -> None:
    hotkeys = [f"hk{i}" for i in range(members)]
    plan = assign_reducers(8 * members, hotkeys, redundancy=2, seed="epoch-1")
    assert all(len(set(r)) == 2 and set(r) <= set(hotkeys) for r in plan.values())
    load = Counter(hk for reducers in plan.values() for hk in reducers)
    assert max(load.values()) - min(load.values()) <= 2
    assert plan != assign_reducers(8 * members, hotkeys, redundancy=2, seed="epoch-2") or members == 2
    with pytest.raises(ValueError):
        assign_reducers(4, ["only-one"], redundancy=2)


def test_the_mean_is_weighted_by_work_and_a_loud_participant_is_clipped() -> None:
    a, b, c = torch.ones(4), 3 * torch.ones(4), 5 * torch.ones(4)
    mean = robust_weighted_mean({"a": a, "b": b, "c": c}, {"a": 1.0, "b": 1.0, "c": 2.0}, clip_factor=10)
    torch.testing.assert_close(mean, (a + b + 2 * c) / 4)
    huge = 1000 * torch.ones(4)
    clipped = robust_weighted_mean({"a": a, "b": b, "x": huge}, {"a": 1, "b": 1, "x": 1}, clip_factor=2.0)
    # x is scaled down to 2 x the median norm (b's), so it cannot drag the mean far.
    torch.testing.assert_close(clipped, (a + b + 6 * torch.ones(4)) / 3)
    with pytest.raises(ValueError):
        robust_weighted_mean({"a": torch.tensor([float("nan")])}, {"a": 1.0})


def test_reducers_given_the_slices_in_any_order_agree_bitwise() -> None:
    g = torch.Generator().manual_seed(0)
    slices = {f"hk{i}": torch.randn(1000, generator=g) for i in range(5)}
    work = {k: float(i + 1) for i, k in enumerate(slices)}
    reversed_order = dict(reversed(list(slices.items())))
    assert torch.equal(robust_weighted_mean(slices, work), robust_weighted_mean(reversed_order, work))


def test_outer_step_lr_one_without_momentum_lands_on_the_average_of_the_replicas() -> None:
    start = torch.zeros(3)
    replicas = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])]
    pseudo = robust_weighted_mean(
        {f"r{i}": start - w for i, w in enumerate(replicas)}, {"r0": 1, "r1": 1}, clip_factor=100
    )
    new, buf = nesterov_step(start, pseudo, None, lr=1.0, mu=0.0)
    torch.testing.assert_close(new, (replicas[0] + replicas[1]) / 2)
    # With momentum the buffer accumulates and the step looks ahead along it.
    new2, buf2 = nesterov_step(new, pseudo, buf, lr=0.5, mu=0.9)
    torch.testing.assert_close(buf2, 0.9 * buf + pseudo)
    torch.testing.assert_close(new2, new - 0.5 * (pseudo + 0.9 * buf2))
