"""The profiler's time budget: it stops growing the batch once per-sample time is flat, or before a
size would run far past the budget, and says so. Timed with a fake clock, so nothing here is slow."""

import time
from types import SimpleNamespace

import pytest

import hetero.profile as profile_module
from hetero.profile import HARD_LIMIT, profile_engine
from hetero.table import Measurement


@pytest.fixture
def fake_device(monkeypatch):
    """An engine whose batch of b takes `seconds(b)` per run; measuring a size costs MIN_REPEATS+1 runs."""
    clock = SimpleNamespace(now=0.0, measured=[])
    monkeypatch.setattr(time, "perf_counter", lambda: clock.now)  # whatever the profiler reads the time with

    def setup(seconds):
        def measure(engine, batch):
            run = seconds(batch)
            clock.now += run * (profile_module.MIN_REPEATS + 1)
            clock.measured.append(batch)
            return Measurement(batch, [run] * 3, [0.0] * 3, [0.0] * 3)

        monkeypatch.setattr(profile_module, "measure_batch", measure)
        return clock

    engine = SimpleNamespace(name="fake", network=SimpleNamespace(name="net", key="net@0", rate_unit="img/s"),
                             device=SimpleNamespace(name="dev"), profile_key="k")
    return engine, setup


def test_flat_per_sample_time_stops_once_the_budget_is_spent(fake_device):
    engine, setup = fake_device
    clock = setup(lambda batch: 0.01 * batch)
    profile = profile_engine(engine, [1, 2, 3, 4, 5, 7, 8], budget_s=0.1, progress=False)
    assert clock.measured == [1, 2, 3]
    assert profile.stopped == "time budget 0.1s spent and per-sample time flat; sizes from 4 up are extrapolated"
    assert profile.predict(8) == pytest.approx(0.08)


def test_a_size_that_would_run_far_past_the_budget_is_not_started(fake_device):
    engine, setup = fake_device
    clock = setup(lambda batch: 0.04)  # per-sample time keeps falling, so it never flattens
    profile = profile_engine(engine, [1, 2, 4, 8], budget_s=0.1, progress=False)
    assert clock.measured == [1]
    assert profile.stopped.startswith(f"batch 2 would pass {HARD_LIMIT}x the time budget of 0.1s")


def test_within_budget_every_size_is_measured(fake_device):
    engine, setup = fake_device
    clock = setup(lambda batch: 0.001 * batch)
    profile = profile_engine(engine, [4, 1, 2, 2], budget_s=10, progress=False)
    assert clock.measured == [1, 2, 4] and profile.stopped is None


def test_a_slow_first_call_does_not_spend_the_budget(fake_device):
    """An engine that compiles on its first call (torch.compile: tens of seconds) is still profiled at
    every size: the budget counts the sizes' runs, not what the first call costs once."""
    engine, setup = fake_device
    clock = setup(lambda batch: 0.001 * batch)
    measure = profile_module.measure_batch

    def compiling_first(engine, batch):
        if not clock.measured:
            clock.now += 60.0  # the first warm-up call compiles
        return measure(engine, batch)

    profile_module.measure_batch = compiling_first
    try:
        profile = profile_engine(engine, [1, 2, 4, 8], budget_s=1.0, progress=False)
    finally:
        profile_module.measure_batch = measure
    assert clock.measured == [1, 2, 4, 8] and profile.stopped is None
