"""Tests for hetero.models: the network registry and ONNX import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

from hetero.errors import HeteroError
from hetero.models import Network, UnknownNetworkError, get_network, network_names, registry

NAMES = [
    "mobilenet", "squeezenet_v1.0", "squeezenet_v1.1", "resnet-18", "resnet-34", "resnet-50",
    "inception_v3", "vgg-16", "vgg-19", "densenet-121",
]

ENCODERS = ["bert-tiny", "bert-base"]  # after the CNNs; tested in tests/test_bert.py

# Published parameter counts (torchvision; inception_v3 without the aux head).
# Ours fold each BatchNorm's gamma and beta into one conv bias, so they are a
# little lower for the BN networks.
PUBLISHED = {
    "mobilenet": 4.2e6, "squeezenet_v1.0": 1_248_424, "squeezenet_v1.1": 1.24e6,
    "resnet-18": 11.7e6, "resnet-34": 21_797_672, "resnet-50": 25.6e6, "inception_v3": 23.8e6,
    "vgg-16": 138.4e6, "vgg-19": 143_667_240, "densenet-121": 8.0e6,
}

# Small networks whose weights are cheap to generate.
SMALL = ["squeezenet_v1.1", "mobilenet"]


def _shape(ty: relax.TensorType) -> list:
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in ty.shape.values]


def _target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                              "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _run(net: Network, ex: relax.VMExecutable, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(x), *[tvm.runtime.tensor(p) for p in net.params]]
    return vm["main"](*args).numpy()


def test_names() -> None:
    assert network_names() == [*NAMES, *ENCODERS]


@pytest.mark.parametrize("name", NAMES)
def test_module_structure(name: str) -> None:
    # The module alone (no weight values), so vgg's 138M weights are not generated here.
    built = registry.build_registered(name)
    mod = built.module
    relax.analysis.well_formed(mod)  # raises on a violation
    main = mod["main"]
    x, *weights = main.params

    side = 299 if name == "inception_v3" else 224
    assert built.input_shape == (3, side, side)
    assert built.output_shape == (1000,)
    n, *rest = _shape(x.ty)
    assert isinstance(n, tvm.tirx.Var) and rest == [3, side, side]
    out_n, *out_rest = _shape(main.ret_ty)
    assert out_n.same_as(n) and out_rest == [1000]  # batch is symbolic, end to end
    assert all(p.ty.dtype == "float32" for p in main.params)

    count = sum(int(np.prod(_shape(w.ty))) for w in weights)
    assert count == built.graph.num_weights()
    assert abs(count / PUBLISHED[name] - 1) < 0.02, count


@pytest.mark.parametrize("name", SMALL)
def test_network_and_weights(name: str) -> None:
    net = get_network(name)
    assert get_network(name) is net  # cached per process
    assert net.name == name and net.dtype == "float32"
    assert net.input_shape == (3, 224, 224) and net.output_shape == (1000,)
    weights = net.module["main"].params[1:]
    assert len(net.params) == len(weights)
    for p, w in zip(net.params, weights, strict=True):
        assert p.dtype == np.float32 and list(p.shape) == _shape(w.ty)
        assert np.isfinite(p).all() and not p.flags.writeable
    assert net.num_params == registry.build_registered(name).graph.num_weights()
    assert len(repr(net)) < 200

    fresh = registry._registered.__wrapped__(name)  # bypasses the cache: weights generated again
    assert fresh is not net
    for a, b in zip(net.params, fresh.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_weights_deterministic_across_processes() -> None:
    """Seeds come from the name, not from Python's randomized hash()."""
    code = ("from hetero.models import get_network; "
            "print(sum(float(p.astype('float64').sum()) for p in get_network('squeezenet_v1.1').params))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)})
    here = sum(float(p.astype("float64").sum()) for p in get_network("squeezenet_v1.1").params)
    assert float(out.stdout.split()[-1]) == here


def test_different_networks_get_different_weights() -> None:
    a, b = get_network("squeezenet_v1.1"), get_network("squeezenet_v1.0")
    assert not np.array_equal(a.params[-1][:10], b.params[-1][:10])


def test_random_input() -> None:
    net = get_network("squeezenet_v1.1")
    x1, x2 = net.random_input(1), net.random_input(2)
    assert x1.shape == (1, 3, 224, 224) and x2.shape == (2, 3, 224, 224)
    assert x1.dtype == np.float32
    np.testing.assert_array_equal(x2[0], x1[0])  # sample i does not depend on the batch size
    np.testing.assert_array_equal(net.random_input(2), x2)
    assert not np.array_equal(net.random_input(1, seed=1), x1)
    assert not np.array_equal(x2[0], x2[1])
    with pytest.raises(ValueError):
        net.random_input(0)


def test_unknown_network() -> None:
    with pytest.raises(UnknownNetworkError) as info:
        get_network("resnet-51")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg == "unknown network 'resnet-51'; choose from: " + ", ".join([*NAMES, *ENCODERS])
    assert "\n" not in msg


@pytest.fixture(scope="module")
def squeezenet_exe() -> tuple[Network, relax.VMExecutable]:
    net = get_network("squeezenet_v1.1")
    return net, relax.build(net.module, _target())


def test_squeezenet_runs_any_batch(squeezenet_exe) -> None:
    net, ex = squeezenet_exe
    y1 = _run(net, ex, net.random_input(1))
    y2 = _run(net, ex, net.random_input(2))  # same compiled module, another batch size
    assert y1.shape == (1, 1000) and y2.shape == (2, 1000)
    assert np.isfinite(y2).all()
    assert y1.std() > 1e-3 and 1e-2 < np.abs(y1).max() < 1e3  # neither vanishing nor exploding
    assert not np.allclose(y2[0], y2[1])
    np.testing.assert_allclose(y2[0], y1[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------- ONNX


def tiny_onnx(path: Path, batch_dim: str | int = "N", n_outputs: int = 1,
               reshape: tuple[int, int] = (0, -1), seed: int = 7) -> dict[str, np.ndarray]:
    """Conv(3->4, 3x3, stride 2, pad 1) -> ReLU -> global avg pool -> Reshape -> Gemm(4->5), with
    weights drawn from `seed`."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"W": rng.standard_normal((4, 3, 3, 3)), "B": rng.standard_normal(4),
         "G": rng.standard_normal((4, 5)), "C": rng.standard_normal(5)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),  # shape is an int64 initializer
        helper.make_node("Gemm", ["f", "G", "C"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array(reshape, np.int64), "shape"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 5])]
    if n_outputs == 2:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [batch_dim, 4, 4, 4]))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, 8])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def tiny_reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    conv = np.einsum("nchwij,ocij->nohw", win, w["W"]) + w["B"][None, :, None, None]
    pooled = np.maximum(conv, 0).mean(axis=(2, 3))
    return pooled @ w["G"] + w["C"]


@pytest.mark.parametrize("batch_dim", ["N", 1])
def test_onnx_model(tmp_path: Path, batch_dim: str | int) -> None:
    path = tmp_path / "tiny.onnx"
    w = tiny_onnx(path, batch_dim)
    net = get_network(path if batch_dim == 1 else str(path))  # a Path works as well as a str
    assert net.name == "tiny" and net.dtype == "float32"
    assert net.input_shape == (3, 8, 8) and net.output_shape == (5,)
    main = net.module["main"]
    relax.analysis.well_formed(net.module)
    assert isinstance(_shape(main.params[0].ty)[0], tvm.tirx.Var)  # batch made symbolic
    assert len(net.params) == len(main.params) - 1 == 4  # weights only; the int64 shape is a constant
    assert sorted(p.size for p in net.params) == sorted(v.size for v in w.values())

    ex = relax.build(net.module, _target())
    for batch in (1, 3):
        x = net.random_input(batch)
        np.testing.assert_allclose(_run(net, ex, x), tiny_reference(x, w), rtol=1e-4, atol=1e-4)


def test_onnx_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(ImportError, match=r"pip install onnx") as info:
        get_network("model.onnx")
    assert isinstance(info.value, HeteroError)  # the command lines print it as one line


def test_onnx_errors(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="no such file"):
        get_network(str(tmp_path / "missing.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf \x00\xff\x12")
    with pytest.raises(ValueError, match="cannot read ONNX model"):
        get_network(str(garbage))
    two = tmp_path / "two.onnx"
    tiny_onnx(two, n_outputs=2)  # several outputs are run by name (tests/test_transformers.py), not refused
    assert len(get_network(str(two)).outputs) == 2
    fixed = tmp_path / "fixed.onnx"
    tiny_onnx(fixed, batch_dim=1, reshape=(1, -1))  # batch size baked into a Reshape
    with pytest.raises(ValueError, match="cannot make the batch dimension symbolic"):
        get_network(str(fixed))


def test_keys_follow_code_not_comments(tmp_path):
    """Module cache and profile keys change when hetero's schedules change, not when a comment does."""
    from hetero.cache import code_digest

    source = tmp_path / "rule.py"
    source.write_text('"""A rule."""\n\ndef tile(n):\n    """Tiles of 16."""\n    return n // 16  # rows\n')
    before = code_digest([source])
    source.write_text('"""A rule, reworded."""\n\ndef tile(n):\n    """Tiles of sixteen."""\n    return n // 16  # r\n')
    assert code_digest([source]) == before
    source.write_text('"""A rule."""\n\ndef tile(n):\n    """Tiles of 16."""\n    return n // 32  # rows\n')
    assert code_digest([source]) != before
