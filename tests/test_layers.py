"""Tests for hetero.layers: one builder, three forms (Relax, ONNX, PyTorch) that compute the same
network with the same weights; Network.onnx_model / torch_module; hetero.from_torch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

import hetero
from hetero.layers import Graph
from hetero.layers.relax import build_module
from hetero.models import FormUnavailableError, Network, get_network

SAMPLE = (3, 19, 19)  # odd sizes, so ceil-mode and padded pools have ragged last windows


def _every_layer(g: Graph, x):  # noqa: ANN001, ANN202 - a builder: tensors of any form
    """Every layer method of Graph, every conv option (BN folded, plain bias, no bias, groups,
    rectangular kernels and paddings, strides), both pool modes."""
    y = g.conv(x, 8, 3, 2, 1)  # 10x10, BN folded + ReLU
    y = g.conv(y, 8, 3, 1, 1, groups=8)  # depthwise
    z = g.conv(y, 16, (1, 3), 1, (0, 1), relu=False, bn_gamma=0.5)
    y = g.relu(g.add(z, g.conv(y, 16, 1, bn=False, relu=False)))  # residual, plain-bias shortcut
    y = g.max_pool(y, 3, 2, ceil_mode=True)  # 5x5 (the last window is ragged)
    y = g.concat([g.conv(y, 8, 1, bn=False), g.conv(y, 8, (3, 1), 1, (1, 0), bias=False),
                  g.avg_pool(y, 3, 1, 1), g.max_pool(y, 3, 1, 1)])  # 48 channels
    y = g.relu(g.batch_norm(y))
    y = g.conv(y, 16, 3, 2, 1)  # 3x3
    h = g.linear(g.flatten(y), 12, relu=True)
    return g.add(g.linear(h, 10), g.classifier(y, 10))


def _tolerance(out: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6)
    assert err < rtol, err


def _run_relax(mod: tvm.IRModule, params, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    ex = relax.build(mod, tvm.target.Target("llvm"))  # the default pipeline
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in params]).numpy()


def _run_ort(model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001 - onnx.ModelProto
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x})[0]


def _run_torch(module, x: np.ndarray) -> np.ndarray:  # noqa: ANN001 - torch.nn.Module
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _inputs(batches=(1, 3)) -> list[np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(1)
    return [rng.standard_normal((b, *SAMPLE), dtype=np.float32) for b in batches]


def test_every_layer_same_on_relax_onnx_torch() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from hetero.layers.onnx import build_model
    from hetero.layers.torch import BuiltModule

    mod, g, output_shape = build_module(_every_layer, SAMPLE)
    relax.analysis.well_formed(mod)
    assert output_shape == (10,)
    params = g.init_weights(np.random.default_rng(0))
    assert [tuple(p.shape) for p in params] == g.weight_shapes
    assert [v.name for v in g.weights] == g.weight_names  # one name per weight, every form
    assert len(set(g.weight_names)) == len(params)

    model = build_model(_every_layer, SAMPLE, params, name="every-layer")
    import onnx

    onnx.checker.check_model(model, full_check=True)  # with shape inference
    module = BuiltModule(_every_layer, SAMPLE, params)
    assert len(list(module.parameters())) == len(params)
    for x in _inputs():
        ref = _run_relax(mod, params, x)
        assert ref.shape == (len(x), 10)
        np.testing.assert_allclose(_run_ort(model, x), ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_run_torch(module, x), ref, rtol=1e-4, atol=1e-4)


def test_torch_form_compiles_and_takes_channels_last() -> None:
    torch = pytest.importorskip("torch")
    from hetero.layers.torch import BuiltModule

    _, g, _ = build_module(_every_layer, SAMPLE)
    params = g.init_weights(np.random.default_rng(0))
    eager = BuiltModule(_every_layer, SAMPLE, params)
    x1, x3 = (torch.from_numpy(x) for x in _inputs())
    with torch.no_grad():
        ref1, ref3 = eager(x1), eager(x3)

    # dynamo traces the builder's plain Python into one graph (backend "eager": no code generation)
    torch._dynamo.reset()
    compiled = torch.compile(BuiltModule(_every_layer, SAMPLE, params), backend="eager",
                             fullgraph=True, dynamic=True)
    last = BuiltModule(_every_layer, SAMPLE, params).to(memory_format=torch.channels_last)
    assert last.weights[0].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for x, ref in ((x1, ref1), (x3, ref3)):
            torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(last(x.to(memory_format=torch.channels_last)), ref,
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["squeezenet_v1.1", "resnet-18"])
def test_registered_onnx_and_torch_forms_agree(name: str) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    net = get_network(name)
    assert net.forms == ("relax", "onnx", "torch")
    x = net.random_input(2)
    out = _run_ort(net.onnx_model(), x)
    ref = _run_torch(net.torch_module(), x)
    assert ref.shape == (2, *net.output_shape)
    _tolerance(out, ref, 1e-3)


def test_registered_onnx_model_holds_the_params() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    net = get_network("squeezenet_v1.1")
    model = net.onnx_model()
    onnx.checker.check_model(model)
    graph = model.graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["y"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", *net.input_shape]
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] \
        == ["N", *net.output_shape]
    weights = net.module["main"].params[1:]
    assert [t.name for t in graph.initializer] == [v.name for v in weights]
    assert len(graph.initializer) == len(net.params)
    for t, p in zip(graph.initializer, net.params):
        np.testing.assert_array_equal(numpy_helper.to_array(t), p)
    assert net.onnx_model() is not model  # a new object each call


def _small_cnn():  # noqa: ANN202 - torch.nn.Module
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    with torch.no_grad():  # statistics other than the identity, so the BatchNorms matter
        for bn in (module[1], module[5]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return module


def test_from_torch_same_on_relax_torch_onnxruntime() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    module = _small_cnn()
    net = hetero.from_torch(module, (3, 16, 16), name="small-cnn")
    assert isinstance(net, Network) and net.name == "small-cnn" and net.dtype == "float32"
    assert net.input_shape == (3, 16, 16) and net.output_shape == (10,)
    assert net.forms == ("relax", "onnx", "torch")
    copied = net.torch_module()
    assert copied is not module and not copied.training, "engines change their module; the user's stays as it is"
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), module.state_dict().values()))

    main = net.module["main"]
    relax.analysis.well_formed(net.module)
    n = main.params[0].ty.shape.values[0]
    assert isinstance(n, tvm.tirx.Var) and n.name == "n"
    assert main.ret_ty.shape.values[0].same_as(n)  # batch symbolic, end to end
    # the weights are the module's parameters (the BatchNorm statistics are buffers: constants)
    assert len(net.params) == len(main.params) - 1 == len(list(module.parameters()))
    for p, q in zip(net.params, module.parameters()):
        np.testing.assert_array_equal(p, q.detach().numpy())

    model = net.onnx_model()
    ex = relax.build(net.module, tvm.target.Target("llvm"))  # the default pipeline
    vm = relax.VirtualMachine(ex, tvm.cpu())
    for batch in (1, 3):
        x = net.random_input(batch)
        out = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in net.params]).numpy()
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_run_ort(model, x), ref, rtol=1e-4, atol=1e-4)


def test_from_torch_with_a_fixed_batch_is_an_error() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    class Fixed(nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            return x.reshape(2, -1)  # the batch size baked in

    with pytest.raises(hetero.HeteroError, match=r"'fixed'") as info:
        hetero.from_torch(Fixed(), (3, 4, 4), name="fixed")
    assert "\n" not in str(info.value)
    del torch


def test_onnx_file_forms(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["in"], ["out"])], "tiny",
        [helper.make_tensor_value_info("in", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    net = get_network(path)
    assert net.forms == ("relax", "onnx")
    with pytest.raises(FormUnavailableError, match=r"'relu' has no PyTorch form.*ONNX file"):
        net.torch_module()
    assert net.onnx_model().SerializeToString() == path.read_bytes()  # the file's own model


def test_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    net = get_network("squeezenet_v1.1")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(FormUnavailableError, match=r"needs torch: pip install 'hetero\[torch\]'$"):
        net.torch_module()
    with pytest.raises(FormUnavailableError, match=r"needs onnx: pip install 'hetero\[onnx\]'$"):
        net.onnx_model()
    assert issubclass(FormUnavailableError, hetero.HeteroError)


def test_network_without_origin_has_only_relax() -> None:
    built = build_module(_every_layer, SAMPLE)
    net = Network("bare", built[0], (), SAMPLE, built[2])
    assert net.forms == ("relax",)
    with pytest.raises(FormUnavailableError, match=r"'bare' has no ONNX form"):
        net.onnx_model()
