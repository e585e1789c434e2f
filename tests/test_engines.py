"""Engines behind one interface, chosen by measurement: every engine computes what TVM's engine does,
a split across engines returns what one engine returns, and the choice follows the profiles."""

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest

import hetero
from hetero import cli
from hetero.engines import ENGINES, OWN_ENGINE, EngineUnavailableError, installed_engines, load_engine
from hetero.errors import HeteroError
from hetero.inference import choose_engines
from hetero.selection import AUTO, parse_engine_choice
from hetero.session import infer
from hetero.table import Measurement, Profile, ProfileTable, engine_of

from .conftest import ROOT, SMALL_NETWORK
from .test_models import tiny_onnx

# every installed engine that runs on the CPU, held against hetero's own; torch.compile compiles for minutes on 2
# cores, so it runs on the tiny model only
SLOW_TO_BUILD = {"torch-compile"}
CPU_ENGINES = [name for name in installed_engines() if name != OWN_ENGINE and name not in SLOW_TO_BUILD
               and (not ENGINES[name].kinds or "cpu" in ENGINES[name].kinds)]


@pytest.fixture(scope="module")
def cpu():
    return hetero.parse_devices("cpu")[0]


@pytest.fixture(scope="module")
def two_cpus(cpu):
    threads = max(1, cpu.target.attrs["num-cores"] // 2)
    return [dataclasses.replace(cpu, name=f"cpu-{x}", threads=threads) for x in "ab"]


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_each_engine_computes_what_tvm_computes(cpu, engine):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(3, seed=2)
    reference, _ = load_engine(network, cpu, "tvm").infer(inputs)
    loaded = load_engine(network, cpu, engine)
    outputs, timing = loaded.infer(inputs)
    assert loaded.name == engine and engine_of(loaded.profile_key) == engine
    assert timing.total_s > 0
    np.testing.assert_allclose(outputs, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.mark.parametrize("engine", installed_engines())
def test_an_onnx_file_runs_on_every_engine_that_takes_it(tmp_path, cpu, engine):
    from .test_models import tiny_reference

    weights = tiny_onnx(tmp_path / "tiny.onnx")
    network = hetero.get_network(str(tmp_path / "tiny.onnx"))
    form = ENGINES[engine].form
    if form and form not in network.forms:  # PyTorch's engines: an .onnx file has no PyTorch form
        with pytest.raises(EngineUnavailableError, match=re.escape(network.why_no_form(form))):
            load_engine(network, cpu, engine)
        return
    inputs = np.random.default_rng(3).standard_normal((4, 3, 8, 8)).astype(np.float32)
    outputs, _ = load_engine(network, cpu, engine).infer(inputs)
    np.testing.assert_allclose(outputs, tiny_reference(inputs, weights), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("onnxruntime" not in installed_engines(), reason="onnxruntime is not installed")
def test_a_split_across_engines_returns_what_one_engine_returns(tmp_path, cpu, two_cpus):
    network = hetero.get_network(SMALL_NETWORK)
    inputs = network.random_input(6, seed=9)
    reference, _ = load_engine(network, cpu, "tvm").infer(inputs)
    report = infer(network, two_cpus, inputs=inputs, table=tmp_path / "t.json", profile_batches=[1, 3],
                   progress=False, engine="cpu-a=tvm,cpu-b=onnxruntime")
    engines = {share.device.name: share.engine for share in report.shares}
    assert engines == {"cpu-a": "tvm", "cpu-b": "onnxruntime"}
    if all(share.size for share in report.shares):
        assert report.shares[0].size + report.shares[1].size == 6
    np.testing.assert_allclose(report.outputs, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    keys = {engine_of(profile.device_key) for profile in ProfileTable.load(tmp_path / "t.json").profiles()}
    assert keys == {"tvm", "onnxruntime"}, "profiles are keyed by engine"


def test_auto_profiles_every_installed_engine_and_reports_the_chosen_one(tmp_path, capsys):
    table = tmp_path / "t.json"
    tiny_onnx(tmp_path / "tiny.onnx")
    rc = cli.inference(["--network", str(tmp_path / "tiny.onnx"), "--batch", "4", "--profile-batches", "1,4",
                        "--table", str(table), "--engine", AUTO, "--no-progress", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    profiled = {engine_of(p.device_key) for p in ProfileTable.load(table).profiles()}
    runnable = {name for name in installed_engines() if not name.startswith("torch")}  # no PyTorch form
    assert profiled == runnable
    import json

    chosen = json.loads(captured.out)["devices"][0]["engine"]
    profiles = {engine_of(p.device_key): p for p in ProfileTable.load(table).profiles()}
    assert chosen == min(profiles, key=lambda name: profiles[name].predict(4))
    cli.print_table([str(table)])
    printed = capsys.readouterr().out
    assert all(f"| engine {name} " in printed for name in runnable)


def _profile(engine: str, per_sample: dict[int, float]) -> Profile:
    return Profile(f"cpu | llvm | fp32 | engine {engine} 1", "net@0", [
        Measurement(batch, [batch * seconds] * 3, [0.0] * 3, [0.0] * 3) for batch, seconds in per_sample.items()])


class _Named:
    def __init__(self, name: str):
        self.name = name


def test_each_device_runs_the_engine_fastest_at_its_share():
    small_fast = _profile("a", {1: 0.001, 100: 0.010})  # 1 ms alone, 10 ms a sample at 100
    large_fast = _profile("b", {1: 0.004, 100: 0.002})
    alone = [[(_Named("a"), small_fast), (_Named("b"), large_fast)]]
    assert [e.name for e in choose_engines(alone, 1)[0]] == ["a"]
    assert [e.name for e in choose_engines(alone, 100)[0]] == ["b"]


def test_engine_choice_per_device(cpu, two_cpus):
    assert parse_engine_choice("auto", two_cpus) == {"cpu-a": AUTO, "cpu-b": AUTO}
    assert parse_engine_choice("tvm,cpu-b=onnxruntime", two_cpus) == {"cpu-a": "tvm", "cpu-b": "onnxruntime"}
    with pytest.raises(HeteroError, match="unknown engine 'tensorrt'"):
        parse_engine_choice("tensorrt", two_cpus)
    with pytest.raises(HeteroError, match="names gpu7"):
        parse_engine_choice("gpu7=torch", two_cpus)


def test_an_engine_asked_for_and_absent_is_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(ENGINES, "openvino", dataclasses.replace(ENGINES["openvino"], requires="no_such_package"))
    rc = cli.inference(["--network", SMALL_NETWORK, "--batch", "1", "--engine", "openvino", "--table",
                        str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err == "error: engine openvino is not installed: pip install 'hetero[openvino]'"
    assert not (tmp_path / "t.json").exists()


def test_import_hetero_loads_no_other_framework():
    code = "import sys, hetero, hetero.cli; print(sorted({'torch', 'onnxruntime', 'openvino', 'onnx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
