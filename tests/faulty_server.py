"""`python -m hetero.serve` on two one-thread CPU devices, cpu0 and cpu1, with device faults on cue, for
tests/test_serve.py: the server's own main, run from this file after it patches two seams. The devices found
(hetero.devices.available_devices, which parse_devices reads) are two copies of this machine's CPU under those
names, as tests/test_reliability.py makes them; Engine.compute, the one call all device work goes through, fails
on cpu1 for a batch holding a sample whose first value is FAIL, and sleeps SLOW_S before a batch holding one
whose first value is SLOW. Nothing in hetero itself changes."""

import dataclasses
import sys
import time

import numpy as np

from hetero import devices
from hetero.command import run_command
from hetero.engines.base import Engine

FAIL, SLOW = 1000.0, 2000.0
SLOW_S = 2.0
NAMES, FAILING = ("cpu0", "cpu1"), "cpu1"


def available_devices() -> tuple[devices.Device, ...]:
    (cpu,) = devices.the_cpu()
    return tuple(dataclasses.replace(cpu, name=name, threads=1) for name in NAMES)


def compute(engine: Engine, batch: np.ndarray):
    first = batch.reshape(len(batch), -1)[:, 0]
    if engine.device.name == FAILING and np.any(first == FAIL):
        raise RuntimeError(f"{FAILING} lost (injected by tests/faulty_server.py)")
    if np.any(first == SLOW):
        time.sleep(SLOW_S)
    return original_compute(engine, batch)


original_compute = Engine.compute

if __name__ == "__main__":  # tests/test_serve.py imports the markers alone
    from hetero.serve.__main__ import main

    Engine.compute = compute
    devices.available_devices = available_devices
    sys.exit(run_command(main, None))
