"""Transformers count too: a ViT (hetero.vit, the tiny config) exported from PyTorch to ONNX runs through every
engine that takes an ONNX file, imports from PyTorch too, and splits across engines like any CNN."""

import dataclasses
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter

import hetero  # noqa: E402
from hetero.engines import installed_engines, load_engine  # noqa: E402
from hetero.execute import run_split  # noqa: E402
from hetero.session import infer  # noqa: E402
from hetero.vit import CONFIGS, ViT, export_onnx, vit  # noqa: E402

TINY = CONFIGS["tiny"]


def _engines(*names: str) -> list:
    return [pytest.param(name, marks=pytest.mark.skipif(name not in installed_engines(),
                                                        reason=f"{name} is not installed")) for name in names]


def _close(outputs: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.fixture(scope="module")
def cpu():
    return hetero.parse_devices("cpu")[0]


@pytest.fixture(scope="module")
def model():
    return vit("tiny", seed=1)


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(5).standard_normal((3, *TINY.input_shape), dtype=np.float32)


@pytest.fixture(scope="module")
def expected(model, inputs):
    with torch.inference_mode():
        return model(torch.from_numpy(inputs)).numpy()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("vit") / "vit-tiny.onnx")


@pytest.fixture(scope="module")
def onnx_network(onnx_file):
    return hetero.get_network(onnx_file)


def test_b16_is_vit_base_16():
    with torch.device("meta"):
        model = ViT(CONFIGS["b16"])
    assert sum(p.numel() for p in model.parameters()) == 86_567_656  # timm's vit_base_patch16_224
    assert CONFIGS["b16"].input_shape == (3, 224, 224)


def test_the_export_has_one_symbolic_batch_dimension(onnx_file, onnx_network):
    graph = onnx.load(onnx_file).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["N", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["N", 10]
    ops = {node.op_type for node in graph.node}
    assert {"Conv", "LayerNormalization", "Softmax", "MatMul"} <= ops and ops & {"Erf", "Gelu"}
    assert onnx_network.input_shape == TINY.input_shape and onnx_network.output_shape == (TINY.classes,)
    assert any(p.ndim == 0 for p in onnx_network.params), "the exporter's scalar constants stay scalars"


@pytest.mark.parametrize("engine", _engines("tvm", "onnxruntime", "openvino"))
def test_the_onnx_file_runs_on_every_engine_that_takes_it(cpu, onnx_network, inputs, expected, engine):
    loaded = load_engine(onnx_network, cpu, engine)
    for size in (3, 1):  # one module for every batch size
        outputs, _ = loaded.infer(inputs[:size])
        _close(outputs, expected[:size])


@pytest.fixture(scope="module")
def torch_network(model):
    return hetero.from_torch(model, TINY.input_shape, name="vit-tiny")


@pytest.mark.parametrize("engine", _engines("tvm", "torch", "onnxruntime"))
def test_the_module_itself_runs_through_from_torch(cpu, torch_network, inputs, expected, engine):
    outputs, _ = load_engine(torch_network, cpu, engine).infer(inputs)
    _close(outputs, expected)


@pytest.mark.skipif("onnxruntime" not in installed_engines(), reason="onnxruntime is not installed")
def test_a_split_across_engines_returns_what_one_engine_returns(tmp_path, cpu, onnx_network):
    threads = max(1, cpu.target.attrs["num-cores"] // 2)
    a, b = [dataclasses.replace(cpu, name=f"cpu-{x}", threads=threads) for x in "ab"]
    batch = np.random.default_rng(9).standard_normal((6, *TINY.input_shape), dtype=np.float32)
    reference, _ = load_engine(onnx_network, cpu, "tvm").infer(batch)

    # both engines at work on a share each, whatever a plan would pick
    outputs, shares, _ = run_split([load_engine(onnx_network, a, "tvm"), load_engine(onnx_network, b, "onnxruntime")],
                                   batch, [2, 4], [0.0, 0.0])
    assert [share.size for share in shares] == [2, 4]
    _close(outputs, reference)

    report = infer(onnx_network, [a, b], inputs=batch, table=tmp_path / "t.json", profile_batches=[1, 3],
                   progress=False, engine="cpu-a=tvm,cpu-b=onnxruntime")
    assert {share.device.name: share.engine for share in report.shares} == {"cpu-a": "tvm", "cpu-b": "onnxruntime"}
    assert sum(share.size for share in report.shares) == 6
    _close(report.outputs, reference)


def test_the_benchmark_script_writes_a_file_the_benchmark_reads(tmp_path, capsys, monkeypatch, model, onnx_file):
    """The script's main in this process, as `python -m benchmarks.vit --out DIR --config tiny --seed 1` runs it.
    Its export is the fixture's (export_onnx is tested above; a second torch.onnx export of the same model costs
    tens of seconds on 2 cores): the file is copied only where the script's model is the fixture's, weight for
    weight, and the script then checks that file against its own model on ONNX Runtime."""
    from benchmarks.vit import main

    exported = []

    def export_once(built, path, opset=18):
        assert built.config == TINY and opset == 18
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values(),
                                                     strict=True))
        exported.append(shutil.copyfile(onnx_file, path))
        return str(path)

    monkeypatch.setattr("hetero.vit.export_onnx", export_once)
    assert main(["--out", str(tmp_path), "--config", "tiny", "--seed", "1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert exported == [tmp_path / "vit-tiny.onnx"]
    assert "checked: ONNX Runtime" in out or "onnxruntime is not installed" in out
    network = hetero.get_network(tmp_path / "vit-tiny.onnx")
    assert network.input_shape == TINY.input_shape and network.output_shape == (TINY.classes,)
