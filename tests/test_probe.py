"""Engines are loaded only to be measured or run: a run whose profiles are in the table loads the engines its
plan uses, and a short probe drops an engine clearly slower than a device's fastest before it is profiled,
remembered in the table so that later runs neither load nor probe it again."""

import dataclasses
import json
import time

import numpy as np
import pytest

import hetero
import hetero.prepare
from hetero.devices import DEFAULT_PRECISION, parse_devices, with_precision
from hetero.engines import ENGINES, Entry, engine_key, installed_engines, load_engine
from hetero.engines.tvm import TVMEngine
from hetero.inference import reserve_cores
from hetero.prepare import Candidate, load_candidates
from hetero.selection import probe_losers
from hetero.session import infer
from hetero.table import Measurement, Profile, ProfileTable, engine_of

from .test_models import tiny_onnx

SLOW_S = 0.05  # what the slow engine adds to every call: far more than the tiny network's call takes


class SlowEngine(TVMEngine):
    """TVM's engine under another name, SLOW_S slower on every call."""

    name = "slow"

    @property
    def version(self) -> str:
        return "slow 1"

    def compute(self, batch):
        time.sleep(SLOW_S)
        return super().compute(batch)


@pytest.fixture
def slow(monkeypatch):
    """The slow engine in the registry, as an installed engine is."""
    monkeypatch.setitem(ENGINES, "slow", Entry("tests.test_probe:SlowEngine", "tvm", "tvm", lambda device: "slow 1"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("probe") / "tiny.onnx"
    tiny_onnx(path)
    return hetero.get_network(str(path))


@pytest.fixture(scope="module")
def cpu():
    """The CPU on one thread, as a run keys it: TVM's threads wait at barriers, so on a busy 2-core machine its
    calls of the tiny network took up to 37 ms with both cores and a fraction of a millisecond with one."""
    one = dataclasses.replace(parse_devices("cpu")[0], name="cpu1", threads=1)
    return reserve_cores(with_precision([one], DEFAULT_PRECISION))[0]


@pytest.fixture
def loads(monkeypatch):
    """The engines each run asks the registry for, by name."""
    names = []

    def counting(network, device, engine="tvm", **options):
        names.append(engine)
        return load_engine(network, device, engine, **options)

    monkeypatch.setattr(hetero.prepare, "load_engine", counting)
    return names


def _profile(key, network, per_sample_s):
    return Profile(key, network.key, [Measurement(b, [b * per_sample_s] * 3, [0.0] * 3, [0.0] * 3) for b in (1, 4)])


@pytest.mark.skipif("onnxruntime" not in installed_engines(), reason="onnxruntime is not installed")
@pytest.mark.parametrize("fastest", ["tvm", "onnxruntime"])
def test_a_run_whose_profiles_are_in_the_table_loads_only_the_engine_it_runs(tmp_path, tiny, cpu, loads, fastest):
    table = ProfileTable.load(tmp_path / "t.json", create=True)
    for name in ("tvm", "onnxruntime"):
        table.put(_profile(engine_key(name, cpu), tiny, 1e-4 if name == fastest else 1e-3))
    table.save()
    inputs = tiny.random_input(4, seed=1)
    report = infer(tiny, [cpu], inputs=inputs, table=tmp_path / "t.json", engine="tvm+onnxruntime", progress=False)
    assert loads == [fastest]
    assert [s.engine for s in report.shares] == [fastest] and not report.profiled
    reference, _ = load_engine(tiny, cpu, "tvm").infer(inputs)
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)


def test_the_probe_drops_a_clearly_slower_engine_and_later_runs_do_not_load_it(tmp_path, tiny, cpu, slow, loads):
    path = tmp_path / "t.json"
    first = infer(tiny, [cpu], batch=4, table=path, engine="tvm+slow", profile_batches=[1, 2, 4], progress=False)
    assert [s.engine for s in first.shares] == ["tvm"]
    assert len(first.dropped) == 1 and "slow not profiled further" in first.dropped[0]
    stored = {engine_of(p.device_key): p for p in ProfileTable.load(path).profiles()}
    assert stored["tvm"].dropped is None and len(stored["tvm"].measurements) == 3
    assert stored["slow"].dropped and stored["slow"].beaten_by == engine_key("tvm", cpu)
    assert [m.batch for m in stored["slow"].measurements] == [1, 4], "measured at the probe's two sizes only"

    loads.clear()
    again = infer(tiny, [cpu], batch=4, table=path, engine="tvm+slow", profile_batches=[1, 2, 4], progress=False)
    assert loads == ["tvm"] and not again.dropped and not again.profiled

    # TVM's profile gone (another TVM, say): TVM is measured again, and the drop judged again from its probe
    doc = json.loads(path.read_text())
    del doc["profiles"][engine_key("tvm", cpu)]
    path.write_text(json.dumps(doc))
    loads.clear()
    infer(tiny, [cpu], batch=4, table=path, engine="tvm+slow", profile_batches=[1, 2, 4], progress=False)
    assert loads == ["tvm"]
    assert ProfileTable.load(path).get(engine_key("slow", cpu), tiny.key).dropped


def test_identical_devices_probe_and_profile_once(tmp_path, tiny, cpu, slow, loads):
    twins = [dataclasses.replace(cpu, name=name) for name in ("cpu-a", "cpu-b")]  # one key
    report = infer(tiny, twins, batch=4, table=tmp_path / "t.json", engine="tvm+slow", profile_batches=[1, 4],
                   progress=False)
    assert sorted(loads) == ["slow", "tvm", "tvm"], "cpu-b loads only the engine it runs"
    assert report.profiled == ["cpu-a"] and len(report.dropped) == 1


def test_a_device_whose_only_engine_was_dropped_still_runs_it(tmp_path, tiny, cpu, slow, loads):
    path = tmp_path / "t.json"
    table = ProfileTable.load(path, create=True)
    table.put(_profile(engine_key("tvm", cpu), tiny, 1e-4))
    probe = _profile(engine_key("slow", cpu), tiny, 1e-2)
    probe.dropped, probe.beaten_by = "slower than tvm", engine_key("tvm", cpu)
    table.put(probe)
    table.save()
    inputs = tiny.random_input(3, seed=2)
    report = infer(tiny, [cpu], inputs=inputs, table=path, engine="slow", profile_batches=[1, 2, 4], progress=False)
    assert loads == ["slow"] and [s.engine for s in report.shares] == ["slow"] and report.profiled == ["cpu1"]
    reference, _ = load_engine(tiny, cpu, "tvm").infer(inputs)
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-5)
    finished = ProfileTable.load(path).get(engine_key("slow", cpu), tiny.key)
    assert finished.dropped is None and [m.batch for m in finished.measurements] == [1, 2, 4]


def test_a_probe_drops_only_engines_slower_by_the_margin_at_every_size():
    names = ["a", "b", "c", "d"]
    seconds = [[1.0, 4.0], [2.0, 7.0], [1.2, 9.0], [float("inf"), float("inf")]]
    losers = probe_losers(names, seconds, [1, 16], margin=1.5)
    assert set(losers) == {1, 3}  # c is close at 1, so it stays
    assert losers[1] == (0, "slower than a (2.0x at batch 1, 1.8x at batch 16)")
    assert "failed at batch 1" in losers[3][1]
    assert probe_losers(["a", "b"], [[float("inf")], [float("inf")]], [1]) == {}, "nothing to compare against"


def test_engines_of_one_device_load_at_the_same_time(monkeypatch, cpu):
    running, most = set(), []

    def loading(network, device, engine="tvm", **options):
        running.add(engine)
        most.append(len(running))
        time.sleep(0.3)
        running.discard(engine)
        if engine == "broken":
            raise RuntimeError("no such engine")
        return object()  # the jobs warm at no size

    monkeypatch.setattr(hetero.prepare, "load_engine", loading)
    jobs = [(Candidate(name, cpu, name), ()) for name in ("a", "b", "broken")]
    failed = load_candidates(None, jobs)
    assert max(most) == 3
    assert [(c.name, error) for c, error in failed] == [("broken", "no such engine")]
