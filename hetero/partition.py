"""Split a batch over devices so that the slowest finishes as early as possible; pure, touches no device.

costs[i][s] is the predicted seconds for device i to run s samples: non-decreasing in s, 0 for s == 0,
inf where the device cannot run that many. A split is a list of shares (samples per device) summing to
the batch, and its makespan is the time of the device that finishes last.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np


def makespan(costs: Sequence[np.ndarray], shares: Sequence[int]) -> float:
    """Predicted seconds until the last device finishes its share."""
    return max(float(cost[share]) for cost, share in zip(costs, shares, strict=True))


def _stack(costs: Sequence[np.ndarray], batch: int) -> np.ndarray:
    """The costs as one (devices, batch + 1) array, checked against the contract the partitioners rely on."""
    if batch < 0:
        raise ValueError(f"batch must be at least 0, got {batch}")
    if not costs:
        raise ValueError("no devices to split the batch over")
    if any(len(cost) < batch + 1 for cost in costs):
        raise ValueError(f"every cost curve needs entries for 0..{batch} samples")
    table = np.array([np.asarray(cost, dtype=float)[: batch + 1] for cost in costs])
    if np.any(table[:, 0] != 0) or np.any(table[:, 1:] < table[:, :-1]) or np.isnan(table).any():
        raise ValueError("cost curves must start at 0 and never fall as samples are added")
    capacity = int(np.isfinite(table[:, 1:]).sum())  # finite entries form a prefix of each row
    if capacity < batch:
        raise ValueError(f"batch {batch} does not fit: the devices together can run at most {capacity} samples")
    return table


def partition_greedy(costs: Sequence[np.ndarray], batch: int) -> list[int]:
    """The seed's heuristic: everything on the fastest device, then move single samples off the slowest.

    Each step takes one sample from the device finishing last and gives it to the device that leaves the
    smallest makespan (ties go to the earlier device); it stops when a move no longer strictly lowers the
    makespan.
    """
    table = _stack(costs, batch)
    devices = np.arange(len(table))
    shares = np.zeros(len(table), dtype=int)
    shares[np.argmin(table[:, batch])] = batch
    while True:
        times = table[devices, shares]
        source = int(np.argmax(times))
        if times[source] == 0:
            break
        shares[source] -= 1
        lightened = table[devices, shares]
        order = np.argsort(lightened)
        # Makespan of giving the sample to device j: its grown time against the largest time of the others.
        others = np.full(len(table), lightened[order[-1]])
        if len(table) > 1:
            others[order[-1]] = lightened[order[-2]]
        trial = np.maximum(table[devices, shares + 1], others)
        trial[source] = np.inf  # giving it back is no move
        target = int(np.argmin(trial))
        if not trial[target] < times[source]:
            shares[source] += 1
            break
        shares[target] += 1
    if not math.isfinite(times.max()):
        raise ValueError(f"the greedy partitioner found no split of batch {batch} that every device can run; "
                         f"the exact partitioner can")
    return shares.tolist()


def _trim(table: np.ndarray, shares: np.ndarray, surplus: int) -> None:
    """Take `surplus` samples off `shares` (in place), each where it lowers that device's time most.

    Times only fall, so the makespan stays. A device's last sample saves its whole remaining time, so a
    device whose share the others can absorb within the makespan is emptied first: one that cannot help gets 0.
    Runs of removals from one device are taken in one step while they beat every other device's next one.
    """
    # (minus what removing the device's top sample saves, device): the biggest saving pops first.
    heap = [(table[i, s - 1] - table[i, s], i) for i, s in enumerate(shares) if s]
    heapq.heapify(heap)
    while surplus:
        _, i = heapq.heappop(heap)
        rival = -heap[0][0] if heap else -np.inf
        s = int(shares[i])
        drops = np.diff(table[i, s - min(s, surplus) : s + 1])[::-1]  # what each further removal saves
        beaten = np.flatnonzero(drops < rival)
        taken = int(beaten[0]) if beaten.size else drops.size
        shares[i] -= taken
        surplus -= taken
        if shares[i]:
            heapq.heappush(heap, (table[i, shares[i] - 1] - table[i, shares[i]], i))


def partition_exact(costs: Sequence[np.ndarray], batch: int) -> list[int]:
    """The split with the smallest makespan, preferring to leave out devices that do not lower it.

    With non-decreasing costs, device i can take s samples within time T exactly when costs[i][s] <= T,
    so within T the devices take count(costs[i][1:] <= T) samples in all. The optimal makespan T* is
    hence the batch-th smallest entry of the cost table without its zero column: an order statistic,
    O(devices x batch) with np.partition, taken among the entries no larger than the best single device's
    time (an upper bound on T*) to keep the selection small. Each device then takes all it can within
    T*, and the surplus is trimmed.
    """
    table = _stack(costs, batch)
    if batch == 0:
        return [0] * len(table)
    body = table[:, 1:]
    single = table[:, batch].min()
    candidates = body[body <= single] if math.isfinite(single) else body[np.isfinite(body)]
    best = np.partition(candidates, batch - 1)[batch - 1]
    shares = (body <= best).sum(axis=1)
    _trim(table, shares, int(shares.sum()) - batch)
    return shares.tolist()


PARTITIONERS: dict[str, Callable[[Sequence[np.ndarray], int], list[int]]] = {
    "exact": partition_exact,
    "greedy": partition_greedy,
}


# Devices running at the same time slow each other down (host memory bandwidth, PCIe, the cores that feed
# accelerators), which profiles of each device alone cannot show. In a split, each device's predictions
# are multiplied by its slowdown in company: what its shares in earlier splits took against their
# prediction (table.Profile.company_slowdown), with 1 + this standing in for its first few. A device
# whose share would gain less than that stays idle.
CONCURRENCY_SLOWDOWN = 0.05


def _in_company(slowdowns: Sequence[float] | None, devices: int) -> list[float]:
    return [1 + CONCURRENCY_SLOWDOWN] * devices if slowdowns is None else list(slowdowns)


def predicted_times(costs: Sequence[np.ndarray], shares: Sequence[int],
                    slowdowns: Sequence[float] | None = None) -> list[float]:
    """Each device's predicted seconds for its share, times its slowdown in company when more than one works."""
    together = sum(1 for share in shares if share) > 1
    factors = _in_company(slowdowns, len(costs)) if together else [1.0] * len(costs)
    return [float(cost[share]) * factor for cost, share, factor in zip(costs, shares, factors, strict=True)]


def _best_in_company(costs: Sequence[np.ndarray], batch: int) -> list[int] | None:
    """The split with the smallest makespan among those where at least two devices work, None if there is none.

    partition_exact's split has the smallest makespan T* of all splits, so where two or more devices work
    in it, it is the answer. Where it puts everything on device j, every split with two or more devices
    working takes at least T* and at least costs[k][1] for a working k != j, so at least
    max(T*, min over k != j of costs[k][1]); [j: batch - 1, k: 1] for that k takes at most that, since
    costs[j][batch - 1] <= costs[j][batch] = T*.
    """
    split = partition_exact(costs, batch)
    if sum(1 for share in split if share) > 1:
        return split
    if batch < 2 or len(costs) < 2:
        return None
    j = int(np.argmax(split))
    k = min((i for i in range(len(costs)) if i != j), key=lambda i: float(costs[i][1]))
    if not math.isfinite(costs[k][1]):
        return None
    split[j], split[k] = batch - 1, 1
    return split


def split_or_single(costs: Sequence[np.ndarray], batch: int, partitioner: str = "exact",
                    slowdowns: Sequence[float] | None = None) -> list[int]:
    """The split predicted to finish first by predicted_times, the best device alone where that is no slower.

    A device alone runs at its profiled speed, devices together at their speeds in company, so the two kinds
    of split are planned apart: "exact" takes the best split with two or more devices working, by the costs
    as slowed in company (_best_in_company), and the best device alone, by its own costs, so the result is the
    smallest predicted makespan over all splits. "greedy" (the seed's heuristic) splits the slowed costs as
    it always did, and its split is weighed against the best device alone by the same predictions.
    """
    slowdowns = _in_company(slowdowns, len(costs))
    slowed = [cost * factor for cost, factor in zip(costs, slowdowns, strict=True)]
    split = _best_in_company(slowed, batch) if partitioner == "exact" else PARTITIONERS[partitioner](slowed, batch)
    single = [0] * len(costs)
    single[int(np.argmin([float(cost[batch]) for cost in costs]))] = batch
    if split is None or max(predicted_times(costs, single, slowdowns)) <= max(predicted_times(costs, split, slowdowns)):
        return single
    return split
