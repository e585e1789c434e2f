"""The main job as one call: compile, profile what the table lacks, partition, run, report.

    import hetero
    report = hetero.infer("resnet-18", "cpu,gpu0", batch=100)
    report.outputs        # (100, 1000) logits, in input order
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .devices import Device, parse_devices
from .errors import HeteroError
from .execute import Engine, ShareResult, load_engine, run_split
from .models import Network, get_network
from .partition import PARTITIONERS
from .profile import SEED_BATCHES, profile_engine
from .table import Profile, ProfileTable

DEFAULT_TABLE = Path("profiles") / "profile_table.json"
DEFAULT_BUDGET_S = 60.0


@dataclass
class InferenceReport:
    """Everything one split run did, for people (cli) and programs (JSON) alike."""

    network: str
    batch: int
    partitioner: str
    partition_s: float
    predicted_s: float
    wall_s: float
    shares: list[ShareResult]
    outputs: np.ndarray
    profiled: list[str]

    @property
    def throughput(self) -> float:
        return self.batch / self.wall_s if self.wall_s > 0 else float("inf")

    def to_dict(self) -> dict:
        return {
            "network": self.network,
            "batch": self.batch,
            "partitioner": self.partitioner,
            "partition_ms": self.partition_s * 1e3,
            "predicted_ms": self.predicted_s * 1e3,
            "wall_ms": self.wall_s * 1e3,
            "throughput_img_s": self.throughput,
            "profiled": self.profiled,
            "devices": [
                {
                    "device": r.device.name,
                    "hardware": r.device.hardware,
                    "samples": r.size,
                    "first_sample": r.start,
                    "predicted_ms": r.predicted_s * 1e3,
                    "measured_ms": r.wall_s * 1e3,
                    "exec_ms": r.timing.exec_s * 1e3 if r.timing else 0.0,
                    "io_ms": (r.timing.h2d_s + r.timing.d2h_s) * 1e3 if r.timing else 0.0,
                    "compile_s": r.compile_s,
                }
                for r in self.shares
            ],
        }


def reserve_cores(devices: Sequence[Device]) -> list[Device]:
    """Leave one core per accelerator for the thread that feeds it, so a busy CPU pool cannot starve it."""
    feeders = sum(1 for d in devices if d.kind != "cpu")
    cores = os.cpu_count() or 1
    cpu_threads = max(1, cores - feeders) if feeders else 0
    return [dataclasses.replace(d, threads=cpu_threads) if d.kind == "cpu" else d for d in devices]


def ensure_profiles(
    engines: Sequence[Engine],
    table: ProfileTable,
    batches: Sequence[int] = SEED_BATCHES,
    reprofile: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: bool = True,
) -> tuple[list[Profile], list[str]]:
    """Each engine's profile from the table, measuring (and saving) the ones missing or asked for again."""
    profiles, measured = [], []
    for engine in engines:
        profile = None if reprofile else table.get(engine.device.key, engine.network.name)
        if profile is None:
            profile = profile_engine(engine, batches, budget_s, progress)
            table.put(profile)
            table.save()
            measured.append(engine.device.name)
        profiles.append(profile)
    return profiles, measured


def plan(profiles: Sequence[Profile], batch: int, partitioner: str = "exact") -> tuple[list[int], list[float], float]:
    """Shares per device, each device's predicted seconds, and the seconds the partitioner took."""
    if partitioner not in PARTITIONERS:
        raise HeteroError(f"unknown partitioner {partitioner!r}; choose from: {', '.join(PARTITIONERS)}")
    costs = [profile.cost_curve(batch) for profile in profiles]
    start = time.perf_counter()
    try:
        shares = PARTITIONERS[partitioner](costs, batch)
    except ValueError as exc:
        raise HeteroError(str(exc)) from exc
    seconds = time.perf_counter() - start
    return shares, [float(cost[share]) for cost, share in zip(costs, shares)], seconds


def infer(
    network: str | Network,
    devices: str | Sequence[Device] = "cpu",
    batch: int | None = None,
    inputs: np.ndarray | None = None,
    table: str | Path | ProfileTable = DEFAULT_TABLE,
    partitioner: str = "exact",
    profile_batches: Sequence[int] = SEED_BATCHES,
    reprofile: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    progress: bool = True,
) -> InferenceReport:
    """Run `inputs` (or `batch` deterministic random samples) through `network` split over `devices`."""
    net = get_network(network) if isinstance(network, str) else network
    chosen = reserve_cores(parse_devices(devices) if isinstance(devices, str) else list(devices))
    if inputs is None:
        if batch is None or batch < 1:
            raise HeteroError(f"batch must be at least 1, got {batch}")
        inputs = net.random_input(batch)
    elif tuple(inputs.shape[1:]) != tuple(net.input_shape) or len(inputs) < 1:
        raise HeteroError(
            f"inputs of shape {tuple(inputs.shape)} do not fit {net.name}, which takes (N, {', '.join(map(str, net.input_shape))})"
        )
    batch = len(inputs)
    if not isinstance(table, ProfileTable):
        table = ProfileTable.load(Path(table), create=True)
    engines = [load_engine(net, device) for device in chosen]
    profiles, measured = ensure_profiles(engines, table, profile_batches, reprofile, budget_s, progress)
    shares, predicted, partition_s = plan(profiles, batch, partitioner)
    outputs, results, wall_s = run_split(engines, inputs, shares, predicted)
    return InferenceReport(
        network=net.name,
        batch=batch,
        partitioner=partitioner,
        partition_s=partition_s,
        predicted_s=max(predicted),
        wall_s=wall_s,
        shares=results,
        outputs=outputs,
        profiled=measured,
    )
