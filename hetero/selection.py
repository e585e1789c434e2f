"""Which engine runs on each device: the one the user names, or the fastest by measurement.

``--engine auto`` (the default) profiles every installed engine that can run the network on a
device; the plan then takes, per device, the engine predicted fastest for the share that device gets.
Before profiling, each engine of a device is probed at one or two sizes (hetero.profile.probe_sizes),
and one slower there than the device's fastest by PROBE_MARGIN or more is dropped (:func:`probe_losers`).
``--engine tvm`` forces one engine everywhere, ``--engine gpu0=torch,cpu=onnxruntime`` one per
device, and ``--engine tvm,gpu0=torch`` both (devices not named take the bare one, else auto);
``tvm+onnxruntime`` chooses between those two by measurement, as auto does between all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

from .devices import Device
from .engines import ENGINES, EngineUnavailableError, engine_class, installed_engines, known_unsupported
from .errors import HeteroError
from .models import Network
from .table import Profile

T = TypeVar("T")  # an engine, or a candidate not loaded yet

AUTO = "auto"
# An engine this many times slower than a device's fastest at every probed size is not profiled further:
# a clear margin, so that noise does not drop an engine that could win at sizes not probed (on an H200,
# resnet-50 in fp16: PyTorch eager 1.7x slower than TVM at batch 16 and 1.5x slower than torch.compile
# at 256; torch.compile 1.07x slower than TVM at 16 and 1.4x faster at 256, and kept)
PROBE_MARGIN = 1.5


def default_engine_choice() -> str:
    """--engine's default: $HETERO_ENGINE (same syntax), else auto."""
    return os.environ.get("HETERO_ENGINE") or AUTO


def parse_engine_choice(text: str, devices: Sequence[Device]) -> dict[str, str]:
    """Each device's engine name, or "auto", from the user's `--engine` text."""
    default, per_device = AUTO, {}
    names = {device.name for device in devices}
    for item in filter(None, (part.strip() for part in text.split(","))):
        device, _, engine = item.rpartition("=")
        unknown = [name for name in engine.split("+") if name != AUTO and name not in ENGINES]
        if unknown or not engine:
            raise HeteroError(f"unknown engine {(unknown or [''])[0]!r} in --engine {text!r}; choose from: "
                              f"{AUTO}, {', '.join(ENGINES)}")
        if not device:
            default = engine
        elif device in names:
            per_device[device] = engine
        else:
            raise HeteroError(f"--engine {text!r} names {device}, which is not among the devices "
                              f"({', '.join(sorted(names))})")
    return {device.name: per_device.get(device.name, default) for device in devices}


def candidate_engines(network: Network, device: Device, choice: str,
                      known: Callable[[str], bool] = lambda name: False) -> list[str]:
    """The engines to consider for `device`: those chosen, or every installed one that can run it.

    An engine for which `known(name)` holds (the table has its profile of `network` on `device`) ran it, so
    it is not imported to ask; the others are (their `unsupported` asks their package)."""

    def why_not(name: str) -> str | None:
        reason = known_unsupported(name, network, device)
        if reason is None and not known(name):
            reason = engine_class(name).unsupported(network, device)
        return reason

    if choice == AUTO:
        return [name for name in installed_engines() if why_not(name) is None]
    names, installed = choice.split("+"), installed_engines()
    for name in names:
        if name not in installed:
            engine_class(name)  # raises the one line naming the extra to install
        reason = why_not(name)
        if reason:
            raise EngineUnavailableError(f"engine {name} cannot run {network.name} on {device.name}: {reason}")
    return names


class Fastest:
    """One device's engines as one profile: at each number of samples, the fastest engine's time.

    What :func:`hetero.inference.plan` needs of a profile (cost curve, slowdown in company), so that a
    first plan can tell each device's share before an engine is chosen for it.
    """

    def __init__(self, profiles: Sequence[Profile]):
        self.profiles = list(profiles)

    def cost_curve(self, n: int) -> np.ndarray:
        return np.minimum.reduce([profile.cost_curve(n) for profile in self.profiles])

    def company_slowdown(self, prior: float) -> float:
        return min(profile.company_slowdown(prior) for profile in self.profiles)


def fastest_at(profiles: Sequence[Profile], samples: int) -> int:
    """The index of the profile predicting the fewest seconds for `samples` (the first on ties)."""
    return int(np.argmin([profile.predict(max(samples, 1)) for profile in profiles]))


def probe_losers(names: Sequence[str], seconds: Sequence[Sequence[float]], sizes: Sequence[int],
                 margin: float = PROBE_MARGIN) -> dict[int, tuple[int, str]]:
    """The engines a probe drops: for each whose `seconds` at every probed size (one list per engine, inf for a
    size that failed or was not reached) exceed the fastest engine's there by `margin` or more, its index mapped
    to the index of the engine fastest at the largest size and the reason in words."""
    best = [min(times[i] for times in seconds) for i in range(len(sizes))]
    fastest = min(range(len(names)), key=lambda k: seconds[k][-1])
    losers = {}
    for k, times in enumerate(seconds):
        if not all(t >= margin * b and math.isfinite(b) for t, b in zip(times, best, strict=True)):
            continue
        ratios = [f"failed at batch {size}" if math.isinf(t) else f"{t / b:.1f}x at batch {size}"
                  for t, b, size in zip(times, best, sizes)]
        losers[k] = (fastest, f"slower than {names[fastest]} ({', '.join(ratios)})")
    return losers


def fastest_per_device(options: Sequence[Sequence[tuple[T, Profile]]]) -> list[T]:
    """Per device, of its (engine, profile) pairs, the engine with the highest throughput at the largest batch
    its profile ran: what a device sustains under load (a server's pick)."""
    def throughput(profile: Profile) -> float:
        batch = profile.largest_measured()
        return batch / max(profile.predict(batch), 1e-12)

    return [max(pairs, key=lambda pair: throughput(pair[1]))[0] for pairs in options]
