"""A session prepares once and runs many times: one preparation per use, the table read once, what the runs
teach it written in batches; hetero.infer and hetero.stream are one-call sessions with the same outputs."""

import dataclasses

import numpy as np
import pytest

import hetero
import hetero.session
from hetero.engines.tvm import profile_key
from hetero.table import ProfileTable

from .test_models import tiny_onnx


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_onnx(folder / "tiny.onnx")
    return hetero.get_network(str(folder / "tiny.onnx"))


@pytest.fixture(scope="module")
def two_cpus():
    cpu = hetero.parse_devices("cpu")[0]
    return [dataclasses.replace(cpu, name=f"cpu-{x}", hardware=f"{cpu.hardware} {x}", threads=1) for x in "ab"]


def test_a_session_prepares_once_per_use_and_reads_its_table_once(tmp_path, tiny, two_cpus, monkeypatch):
    prepared, loaded = [], []
    prepare, load = hetero.session.prepare_engines, ProfileTable.load
    monkeypatch.setattr(hetero.session, "prepare_engines", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    monkeypatch.setattr(ProfileTable, "load", classmethod(lambda cls, *a, **k: loaded.append(1) or load(*a, **k)))
    x = np.random.default_rng(1).standard_normal((40, 3, 8, 8)).astype(np.float32)
    options = hetero.Options(table=tmp_path / "t.json", profile_batches=(1, 8, 32), progress=False)
    with hetero.Session(tiny, two_cpus, options) as session:
        first = session.run(inputs=x)
        second = session.run(inputs=x)
        streamed = session.stream(x)
        served = session.engines()
    assert len(prepared) == 3, "one preparation for the split of 40, one for the stream, one for serving"
    assert len(loaded) == 1, "the table is read once"
    np.testing.assert_array_equal(first.outputs, second.outputs)
    np.testing.assert_allclose(streamed.outputs, first.outputs, rtol=1e-5, atol=1e-5)
    assert sorted(engine.device.name for engine, _ in served) == ["cpu-a", "cpu-b"]
    alone = hetero.infer(tiny, two_cpus, inputs=x, table=tmp_path / "t.json", profile_batches=[1, 8, 32],
                         progress=False)
    np.testing.assert_allclose(alone.outputs, first.outputs, rtol=1e-5, atol=1e-5)


def test_what_the_runs_teach_the_table_is_written_when_the_session_closes(tmp_path, tiny, two_cpus):
    path = tmp_path / "t.json"
    x = np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32)
    session = hetero.Session(tiny, two_cpus, hetero.Options(table=path, profile_batches=(1, 8, 32), progress=False))
    session.run(inputs=x)

    def learned_on_disk():  # a device that worked beside the other, or one the plan left idle
        table = ProfileTable.load(path)
        profiles = [table.get(profile_key(device), tiny.key) for device in two_cpus]
        return any(profile.company or profile.idle_splits for profile in profiles)

    assert not learned_on_disk(), "not written after each run"
    session.close()
    assert learned_on_disk(), "written when the session closes"


def test_options_are_frozen_and_changed_by_keywords(tmp_path, tiny):
    options = hetero.Options(progress=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.progress = True
    with pytest.raises(TypeError):
        hetero.infer(tiny, "cpu", batch=2, options=options, no_such_option=1)
