"""Which engine runs on each device: the one the user names, or the fastest by measurement.

``--engine auto`` (the default) profiles every installed engine that can run the network on a
device; the plan then takes, per device, the engine predicted fastest for the share that device gets.
``--engine tvm`` forces one engine everywhere, ``--engine gpu0=torch,cpu=onnxruntime`` one per
device, and ``--engine tvm,gpu0=torch`` both (devices not named take the bare one, else auto);
``tvm+onnxruntime`` chooses between those two by measurement, as auto does between all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .devices import Device
from .engines import ENGINES, EngineUnavailableError, engine_class, runnable_engines
from .errors import HeteroError
from .models import Network
from .table import Profile

AUTO = "auto"


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


def candidate_engines(network: Network, device: Device, choice: str) -> list[str]:
    """The engines to load for `device`: those chosen, or every installed one that can run it."""
    if choice == AUTO:
        return [name for name, reason in runnable_engines(network, device).items() if reason is None]
    names = choice.split("+")
    for name in names:
        reason = engine_class(name).unsupported(network, device)
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
