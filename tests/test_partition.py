"""The partitioners against brute force on small random cost tables, plus the contract's edge cases."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hetero.partition import (
    PARTITIONERS,
    makespan,
    partition_exact,
    partition_greedy,
    predicted_times,
    split_or_single,
)


@st.composite
def cost_tables(draw):
    """2-4 monotone cost curves starting at 0, with ties, plateaus, inf tails and spare length past the batch."""
    batch = draw(st.integers(0, 12))
    devices = draw(st.integers(2, 4))
    length = batch + 1 + draw(st.integers(0, 3))
    costs = []
    for _ in range(devices):
        steps = draw(st.lists(st.integers(0, 6), min_size=length - 1, max_size=length - 1))
        curve = np.concatenate([[0.0], np.cumsum(steps, dtype=float)])
        limit = draw(st.integers(0, length))  # the device can run at most `limit` samples
        curve[limit + 1 :] = np.inf
        costs.append(curve)
    return costs, batch


def _splits(batch: int, devices: int):
    """Every share vector of `devices` non-negative ints summing to `batch`."""
    if devices == 1:
        yield (batch,)
        return
    for first in range(batch + 1):
        for rest in _splits(batch - first, devices - 1):
            yield (first, *rest)


def _brute_force(costs, batch) -> float:
    return min(makespan(costs, shares) for shares in _splits(batch, len(costs)))


def _feasible(costs, batch) -> bool:
    return sum(int(np.isfinite(c[1 : batch + 1]).sum()) for c in costs) >= batch


@settings(max_examples=300, deadline=None)
@given(cost_tables())
def test_exact_matches_brute_force_and_beats_the_rest(case):
    costs, batch = case
    if not _feasible(costs, batch):
        with pytest.raises(ValueError, match="does not fit"):
            partition_exact(costs, batch)
        return
    shares = partition_exact(costs, batch)
    assert sum(shares) == batch and min(shares) >= 0 and all(isinstance(s, int) for s in shares)
    best = makespan(costs, shares)
    assert best == _brute_force(costs, batch)
    assert best <= min(c[batch] for c in costs)
    try:
        greedy = partition_greedy(costs, batch)
    except ValueError:
        return  # greedy can get stuck where no single device fits the batch
    assert sum(greedy) == batch and min(greedy) >= 0
    assert best <= makespan(costs, greedy)


def test_greedy_follows_the_seed_heuristic():
    # Start: all 4 on device 0 (8). Moves: 0->1 gives max(6, 3) = 6, then 0->1 gives max(4, 6) = 6: no strict fall.
    costs = [np.array([0, 2, 4, 6, 8.0]), np.array([0, 3, 6, 9, 12.0])]
    assert partition_greedy(costs, 4) == [3, 1]


def test_exact_beats_greedy_where_greedy_stalls():
    # Greedy reaches [3, 3, 0]; then moving a sample off either busy device leaves the other at 3: no strict fall.
    costs = [np.arange(7.0)] * 3
    assert partition_greedy(costs, 6) == [3, 3, 0]
    assert partition_exact(costs, 6) == [2, 2, 2]


def test_device_that_cannot_help_gets_nothing():
    fast = np.array([0, 1, 2, 3, 4.0])
    slow = np.array([0, 4, 8, 12, 16.0])  # one sample already takes as long as the fast device's whole batch
    assert partition_exact([fast, slow], 4) == [4, 0]
    assert partition_exact([slow, fast], 4) == [0, 4]


def test_plateau_absorbs_a_device():
    plateau = np.array([0, 5, 10, 10, 10.0])  # three samples cost what two do
    other = np.array([0, 9, 10, 20, 30.0])
    assert partition_exact([plateau, other], 4) == [4, 0]


def test_identical_flat_devices_use_one():
    flat = np.concatenate([[0.0], np.full(1000, 7.0)])
    shares = partition_exact([flat] * 8, 1000)
    assert sorted(shares) == [0] * 7 + [1000]


def test_balances_identical_linear_devices():
    linear = np.arange(101, dtype=float)
    assert partition_exact([linear] * 4, 100) == [25, 25, 25, 25]


def test_memory_limit_is_respected():
    capped = np.concatenate([np.arange(4, dtype=float) * 0.1, np.full(7, np.inf)])  # at most 3 samples
    slow = np.arange(11, dtype=float)
    shares = partition_exact([capped, slow], 10)
    assert shares == [3, 7] and math.isfinite(makespan([capped, slow], shares))


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_no_finite_split_is_a_clear_error(name):
    capped = np.array([0, 1, np.inf, np.inf])
    with pytest.raises(ValueError, match="batch 3 does not fit: the devices together can run at most 2 samples"):
        PARTITIONERS[name]([capped, capped], 3)


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_zero_batch(name):
    assert PARTITIONERS[name]([np.zeros(1), np.zeros(1)], 0) == [0, 0]


@pytest.mark.parametrize(
    "costs, batch",
    [([np.array([0, 1.0])], 2), ([np.array([1, 2.0])], 1), ([np.array([0, 2, 1.0])], 2), ([], 1)],
    ids=["too-short", "nonzero-start", "falling", "no-devices"],
)
def test_contract_violations_are_refused(costs, batch):
    with pytest.raises(ValueError):
        partition_exact(costs, batch)


def test_a_split_that_gains_less_than_the_slowdown_stays_on_the_best_device():
    fast, slow = np.arange(101) * 1.0, np.arange(101) * 40.0  # the slow device could take 2 of 100 samples
    assert partition_exact([fast, slow], 100) == [98, 2]
    assert split_or_single([fast, slow], 100) == [100, 0]
    assert split_or_single([fast, slow], 100, slowdowns=[1.0, 1.0]) == [98, 2]
    assert predicted_times([fast, slow], [98, 2]) == pytest.approx([98 * 1.05, 80 * 1.05])
    assert predicted_times([fast, slow], [100, 0]) == [100.0, 0.0]


def test_a_split_that_gains_more_than_the_slowdown_is_kept():
    fast, half = np.arange(101) * 1.0, np.arange(101) * 2.0
    assert split_or_single([fast, half], 99) == [66, 33]


def test_a_device_slowed_more_in_company_gets_less():
    fast, half = np.arange(101) * 1.0, np.arange(101) * 2.0
    assert split_or_single([fast, half], 99, slowdowns=[1.0, 2.0]) == [80, 19]
    assert predicted_times([fast, half], [80, 19], [1.0, 2.0]) == [80.0, 76.0]
    assert split_or_single([fast, half], 99, slowdowns=[1.0, 100.0]) == [99, 0]


@settings(max_examples=200, deadline=None)
@given(cost_tables(), st.sampled_from(sorted(PARTITIONERS)), st.lists(st.sampled_from([1.0, 1.05, 1.5, 3.0]), min_size=8,
                                                                      max_size=8))
def test_chosen_split_is_never_predicted_slower_than_the_best_device_or_the_greedy(case, name, factors):
    costs, batch = case
    slowdowns = factors[: len(costs)]
    if not _feasible(costs, batch):
        return
    try:
        chosen = max(predicted_times(costs, split_or_single(costs, batch, name, slowdowns), slowdowns))
    except ValueError:  # the greedy gets stuck where no single device fits the batch
        assert name == "greedy"
        return
    assert chosen <= min(float(cost[batch]) for cost in costs)
    if name == "exact":
        try:
            greedy = split_or_single(costs, batch, "greedy", slowdowns)
        except ValueError:
            return
        assert chosen <= max(predicted_times(costs, greedy, slowdowns))


def test_a_device_faster_in_company_is_not_left_alone_at_its_slower_solo_time():
    # Device 0 alone: 1 s per sample; in company it has run at half its prediction. Device 1: 6 s per sample,
    # the default 5% slower in company. Slowed, device 0 takes all 10 in 5 s, sooner than any split, but
    # alone it is not slowed (nor sped up): 10 s. [9, 1] is predicted at max(9 * 0.5, 6 * 1.05) = 6.3 s.
    fast, slow = np.arange(11) * 1.0, np.arange(11) * 6.0
    assert partition_exact([fast * 0.5, slow * 1.05], 10) == [10, 0]
    assert max(predicted_times([fast, slow], [10, 0], [0.5, 1.05])) == 10.0
    assert split_or_single([fast, slow], 10, slowdowns=[0.5, 1.05]) == [9, 1]
    assert predicted_times([fast, slow], [9, 1], [0.5, 1.05]) == pytest.approx([4.5, 6.3])
    # Where partition_exact's split already has two devices working, it is the answer.
    assert split_or_single([fast, slow], 10, slowdowns=[0.5, 0.5]) == [9, 1]
    assert split_or_single([fast], 10, slowdowns=[0.5]) == [10], "one device has no company"
    assert split_or_single([fast, slow], 1, slowdowns=[0.5, 1.05]) == [1, 0], "one sample has no company"


def test_plan_picks_the_split_its_own_predictions_favour():
    from hetero.inference import plan
    from hetero.table import Measurement, Profile

    def linear(key, per_sample_s, company):
        measurements = [Measurement(b, [per_sample_s * b] * 3, [0.0] * 3, [0.0] * 3) for b in (1, 10)]
        return Profile(key, "net", measurements, company=company)

    shares, predicted, _ = plan([linear("a", 1.0, [0.5] * 3), linear("b", 6.0, [])], 10)
    assert shares == [9, 1] and predicted == pytest.approx([4.5, 6.3])


@st.composite
def slowed_cost_tables(draw):
    """2-3 monotone float cost curves from 0 (ties, plateaus, sometimes an inf tail) and a slowdown per device."""
    batch = draw(st.integers(0, 8))
    devices = draw(st.integers(2, 3))
    costs = []
    for _ in range(devices):
        steps = draw(st.lists(st.sampled_from([0.0, 1.0, 2.5]) | st.floats(0, 10), min_size=batch, max_size=batch))
        curve = np.concatenate([[0.0], np.cumsum(steps, dtype=float)])
        if draw(st.booleans()):
            curve[draw(st.integers(1, batch + 1)) :] = np.inf
        costs.append(curve)
    slowdowns = draw(st.lists(st.sampled_from([0.5, 1.0, 1.05]) | st.floats(0.3, 3), min_size=devices,
                              max_size=devices))
    return costs, batch, slowdowns


@settings(max_examples=500, deadline=None)
@given(slowed_cost_tables())
@example(([np.arange(11) * 1.0, np.arange(11) * 6.0], 10, [0.5, 1.05]))
@example(([np.array([0, 5, 5, 5.0]), np.array([0, 1, 9, 9.0])], 3, [0.3, 3.0]))
def test_exact_plan_is_the_minimum_of_its_own_predictions_over_every_split(case):
    costs, batch, slowdowns = case
    if not _feasible(costs, batch):
        return
    predicted = {shares: max(predicted_times(costs, shares, slowdowns)) for shares in _splits(batch, len(costs))}
    best = min(predicted.values())
    shares = split_or_single(costs, batch, "exact", slowdowns)
    assert sum(shares) == batch and min(shares) >= 0 and all(isinstance(s, int) for s in shares)
    assert max(predicted_times(costs, shares, slowdowns)) == pytest.approx(best, rel=1e-12)
    if min(float(cost[batch]) for cost in costs) == best:
        assert sum(1 for s in shares if s) <= 1, "a tie goes to the best device alone"
    try:
        greedy = split_or_single(costs, batch, "greedy", slowdowns)
    except ValueError:
        return  # the greedy gets stuck where no single device fits the batch
    assert max(predicted_times(costs, greedy, slowdowns)) <= min(float(cost[batch]) for cost in costs)
