"""Stage assignment balances measured capacity and moves a miner only when a stage starves."""

from __future__ import annotations

from orchestrator.assignment import MinerLoad, assign_stage, plan_move, stage_capacity


def test_new_miners_fill_empty_stages_first() -> None:
    miners: list[MinerLoad] = []
    for i in range(3):
        stage = assign_stage(miners, 3)
        miners.append(MinerLoad(f"m{i}", stage, None))
    assert sorted(m.stage for m in miners) == [0, 1, 2]


def test_assignment_follows_throughput_not_head_count() -> None:
    # Stage 1 has two miners, but both are slow: it is still the bottleneck, so the newcomer goes there.
    miners = [
        MinerLoad("a", 0, 1.0),
        MinerLoad("b", 1, 5.0),
        MinerLoad("c", 1, 5.0),
        MinerLoad("d", 2, 1.0),
    ]
    assert stage_capacity(miners, 3) == [1.0, 0.4, 1.0]
    assert assign_stage(miners, 3) == 1


def test_unmeasured_miners_count_as_the_median() -> None:
    miners = [MinerLoad("a", 0, 2.0), MinerLoad("b", 1, None), MinerLoad("c", 2, 4.0)]
    assert stage_capacity(miners, 3) == [0.5, 1 / 3, 0.25]


def test_a_starving_stage_gets_a_miner_from_the_richest_stage() -> None:
    miners = [
        MinerLoad("a", 0, 1.0),
        MinerLoad("b", 0, 1.0),
        MinerLoad("c", 0, 2.0),
        MinerLoad("d", 2, 1.0),
    ]
    move = plan_move(miners, 3)  # stage 1 has nobody at all
    assert move is not None
    assert (move.from_stage, move.to_stage, move.hotkey) == (0, 1, "c")  # the donor's slowest miner


def test_balanced_or_single_miner_stages_are_left_alone() -> None:
    balanced = [MinerLoad("a", 0, 1.0), MinerLoad("b", 1, 1.2), MinerLoad("c", 2, 0.9)]
    assert plan_move(balanced, 3) is None
    # Stage 1 starves, but moving the only miner of another stage would starve that one instead.
    lonely = [MinerLoad("a", 0, 1.0), MinerLoad("c", 2, 1.0)]
    assert plan_move(lonely, 3) is None


def test_no_move_that_would_make_the_donor_the_new_bottleneck() -> None:
    # Stage 1 is slow (capacity 0.4) but the donor (0: 2 miners, capacity 1.0 + 0.5) would drop to 1.0 or
    # 0.5 while stage 1 rises to 1.4 or 0.9: moving the slow one leaves the donor at 1.0 >= 0.9, so it moves.
    miners = [MinerLoad("a", 0, 1.0), MinerLoad("b", 0, 2.0), MinerLoad("c", 1, 2.5), MinerLoad("d", 2, 0.5)]
    move = plan_move(miners, 3)
    assert move is not None and move.hotkey == "b"
    # With a donor barely richer than the starving stage, nothing moves (hysteresis).
    close = [MinerLoad("a", 0, 1.0), MinerLoad("b", 0, 1.0), MinerLoad("c", 1, 1.1), MinerLoad("d", 2, 0.5)]
    assert plan_move(close, 3) is None
