"""hetero.schedules.cpu: scheduled CPU kernels agree with TVM's unscheduled default
pipeline, and are actually scheduled (parallel loops, the intended rule)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from hetero.compile import module_weights
from hetero.devices import cpu_target
from hetero.schedules.base.analysis import static_shape
from hetero.schedules.base.rule import Rule, ScheduleKernels
from hetero.schedules.cpu import RULES, Conv2D, Dense, Generic, ParallelOnly, Window
from hetero.schedules.cpu.common import located
from hetero.schedules.cpu.conv2d import find_conv
from hetero.schedules.cpu.pipeline import cpu_pipeline

TARGET = cpu_target()
BATCHES = (1, 3)
RTOL = 1e-4


class _Graph:
    """A tiny BlockBuilder wrapper: symbolic batch, weights as parameters."""

    def __init__(self, shape: tuple[int, ...]):
        self.n = tirx.Var("n", "int64")
        self.sample_shape = shape
        self.x = relax.Var("x", relax.TensorType((self.n, *shape), "float32"))
        self.params: list[relax.Var] = []
        self.values: list[np.ndarray] = []
        self.rng = np.random.default_rng(len(shape) * 7 + sum(shape))

    def weight(self, *shape: int) -> relax.Var:
        var = relax.Var(f"w{len(self.params)}", relax.TensorType(shape, "float32"))
        self.params.append(var)
        self.values.append(self.rng.standard_normal(shape).astype("float32") * 0.3)
        return var


def _build(shape, body) -> tuple[tvm.IRModule, list[np.ndarray], tuple[int, ...]]:
    g = _Graph(shape)
    bb = relax.BlockBuilder()
    with bb.function("main"):
        with bb.dataflow():
            out = bb.emit_output(body(bb, g, g.x))
        bb.emit_func_output(out, params=[g.x, *g.params])
    return bb.get(), g.values, shape


def conv(bb, g, x, cin, cout, k, stride=1, pad=0, groups=1, relu=True, kw=None):
    kw = k if kw is None else kw
    w = g.weight(cout, cin // groups, k, kw)
    b = g.weight(cout, 1, 1)
    y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad, groups=groups))
    y = bb.emit(relax.op.add(y, b))
    return bb.emit(relax.op.nn.relu(y)) if relu else y


GRAPHS = {
    # name: (sample shape, body, {expected rule for functions whose name contains key})
    "conv3x3_pad": ((8, 10, 10), lambda bb, g, x: conv(bb, g, x, 8, 32, 3, pad=1),
                    {"conv2d": "conv2d"}),
    "conv3x3_stride2_odd": ((8, 11, 11), lambda bb, g, x: conv(bb, g, x, 8, 32, 3, 2, 1),
                            {"conv2d": "conv2d"}),
    "conv1x1_residual": ((16, 7, 7), lambda bb, g, x: bb.emit(relax.op.nn.relu(bb.emit(
        relax.op.add(conv(bb, g, x, 16, 16, 1, relu=False), x)))), {"conv2d": "conv2d"}),
    "conv7x7_stem": ((3, 20, 20), lambda bb, g, x: conv(bb, g, x, 3, 16, 7, 2, 3),
                     {"conv2d": "conv2d"}),
    "conv1x7_7x1": ((8, 9, 9), lambda bb, g, x: conv(
        bb, g, conv(bb, g, x, 8, 16, 1, pad=(0, 3), kw=7), 16, 16, 7, pad=(3, 0), kw=1),
        {"conv2d": "conv2d"}),
    "conv1x1_small_weights": ((8, 16, 16), lambda bb, g, x: conv(bb, g, x, 8, 32, 1),
                              {"conv2d": "conv2d"}),
    "conv5x5_dilated": ((4, 14, 14), lambda bb, g, x: bb.emit(relax.op.nn.conv2d(
        x, g.weight(16, 4, 5, 5), padding=4, dilation=2)), {"conv2d": "conv2d"}),
    "conv_odd_channels": ((5, 9, 9), lambda bb, g, x: conv(bb, g, x, 5, 6, 3, pad=1), {}),
    "grouped": ((8, 9, 9), lambda bb, g, x: conv(bb, g, x, 8, 16, 3, pad=1, groups=2), {}),
    "depthwise_s1": ((16, 12, 12), lambda bb, g, x: conv(bb, g, x, 16, 16, 3, 1, 1, groups=16),
                     {"conv2d": "window"}),
    "depthwise_s2": ((16, 12, 12), lambda bb, g, x: conv(bb, g, x, 16, 16, 3, 2, 1, groups=16),
                     {"conv2d": "window"}),
    "pools": ((8, 13, 13), lambda bb, g, x: bb.emit(relax.op.nn.adaptive_avg_pool2d(
        bb.emit(relax.op.nn.avg_pool2d(
            bb.emit(relax.op.nn.max_pool2d(x, 3, 2, 1)), 3, 1, 1, count_include_pad=True)), 1)),
        {"max_pool2d": "window", "avg_pool2d": "window"}),
    "dense": ((256,), lambda bb, g, x: bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(
        bb.emit(relax.op.matmul(x, g.weight(256, 40))), g.weight(40))))),
        {"matmul": "dense"}),
    "concat_flatten_softmax": ((4, 6, 6), lambda bb, g, x: bb.emit(relax.op.nn.softmax(
        bb.emit(relax.op.reshape(bb.emit(relax.op.concat(
            [conv(bb, g, x, 4, 8, 3, pad=1), conv(bb, g, x, 4, 4, 1)], axis=1)), (g.n, -1))))), {}),
}


def _run(ex, inputs):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


@pytest.fixture(scope="module")
def built():
    """name -> (default executable, scheduled executable, weights, sample shape, pass)."""
    out = {}
    for name, (shape, body, _) in GRAPHS.items():
        mod, values, shape = _build(shape, body)
        default = relax.build(mod, TARGET)
        sched = ScheduleKernels(RULES, TARGET)
        with TARGET:
            legal = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(TARGET) + cpu_generic.legalize_passes(TARGET)
            )(mod)
            scheduled_mod = sched(legal)
        ex = relax.build(mod, TARGET, relax_pipeline=cpu_pipeline(TARGET))
        out[name] = (default, ex, values, shape, sched.applied, scheduled_mod)
    return out


@pytest.mark.parametrize("name", list(GRAPHS))
def test_matches_default_pipeline(built, name):
    default, ex, values, shape, _, _ = built[name]
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        x = rng.standard_normal((batch, *shape)).astype("float32")
        ref = _run(default, [x, *values])
        got = _run(ex, [x, *values])
        assert got.shape == ref.shape
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert err < RTOL, f"{name} batch {batch}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "options",
    [{"fo_inner": True}, {"batch_in_task": True}, {"batch_in_task": False},
     {"pack_at": "root", "pack_order": "f_outer"}, {"max_unroll_window": 49},
     {"columns_max_cin": 0}],
    ids=str,
)
def test_conv_option_variants_match(built, options):
    """The non-default variants of the conv2d rule are correct too."""
    rules = [Conv2D(**options) if isinstance(rule, Conv2D) else rule for rule in RULES]
    for name in ("conv1x1_small_weights", "conv7x7_stem", "conv3x3_stride2_odd"):
        default, _, values, shape, _, _ = built[name]  # the graph's default build, and its weights
        ex = relax.build(_build(*GRAPHS[name][:2])[0], TARGET, relax_pipeline=cpu_pipeline(TARGET, rules=rules))
        x = np.random.default_rng(1).standard_normal((2, *shape)).astype("float32")
        ref = _run(default, [x, *values])
        got = _run(ex, [x, *values])
        assert np.abs(got - ref).max() / np.abs(ref).max() < RTOL, (name, options)


def test_conv_weights_are_packed_once_outside_main():
    """With the weights marked as parameters (``num_input``), the conv2d rule's weight packing moves
    into ``main_transform_params``, which an engine runs once: ``main`` takes packed weights."""
    mod, values, shape = _build(*GRAPHS["conv1x1_small_weights"][:2])
    mod["main"] = mod["main"].with_attr("num_input", 1)
    ex = relax.build(mod, TARGET, relax_pipeline=cpu_pipeline(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    prepared = module_weights(vm, [tvm.runtime.tensor(v) for v in values])
    assert [w.shape for w in prepared] != [v.shape for v in values]
    assert any(len(w.shape) == 5 for w in prepared)  # [K/B, C, kh, kw, B]
    x = np.random.default_rng(2).standard_normal((2, *shape)).astype("float32")
    ref = _run(relax.build(mod, TARGET), [x, *values])
    got = vm["main"](tvm.runtime.tensor(x), *prepared).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < RTOL


def _legalized(name: str) -> tvm.IRModule:
    mod, _, _ = _build(*GRAPHS[name][:2])
    with TARGET:
        return tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(TARGET) + cpu_generic.legalize_passes(TARGET)
        )(mod)


@pytest.mark.parametrize("name,max_cin,picked", [
    ("conv1x1_small_weights", 32, True),  # 8 -> 32 channels, 16 columns
    ("conv1x1_small_weights", 4, False),  # more input channels than the option allows
    ("conv3x3_pad", 32, False),  # reads a window of columns
    ("conv3x3_stride2_odd", 32, False),
    ("conv1x1_residual", 32, False),  # 7 columns: no whole vector
])
def test_column_tiles_only_for_unstrided_1x1_convs_over_few_channels(name, max_cin, picked):
    rule = Conv2D(columns_max_cin=max_cin)
    funcs = [f for gv, f in _legalized(name).functions_items()
             if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert funcs
    for func in funcs:
        sch, _, (conv, w_load, d_load) = located(func, find_conv)
        stmt = sch.get(conv)
        _, channels, _, columns = static_shape(stmt.writes[0].source)
        tile = rule.columns_tile(stmt, w_load, d_load, channels, columns, 16)
        assert (tile is not None) is picked


def _parallel_loops(func: tirx.PrimFunc) -> int:
    found = []

    def visit(node):
        if node.kind == tirx.ForKind.PARALLEL:
            found.append(node)

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="post")
    return len(found)


@pytest.mark.parametrize("name", list(GRAPHS))
def test_every_kernel_scheduled_with_parallel_loops(built, name):
    _, _, _, _, applied, scheduled_mod = built[name]
    expected = GRAPHS[name][2]
    prim_funcs = {gv.name_hint: f for gv, f in scheduled_mod.functions_items()
                  if isinstance(f, tirx.PrimFunc)}
    assert prim_funcs
    for fname, func in prim_funcs.items():
        assert applied.get(fname), f"{fname} was left unscheduled"
        assert func.attrs.get("tirx.is_scheduled", False)
        if fname.startswith("reshape"):
            continue  # a pure view, nothing to run in parallel
        assert _parallel_loops(func) > 0, f"{fname} ({applied[fname]}) has no parallel loop"
    for key, rule in expected.items():
        hits = {f: r for f, r in applied.items() if f.startswith((key, "fused_" + key))}
        assert hits, f"no function named like {key!r}: {sorted(applied)}"
        for fname, got in hits.items():
            assert got == rule, f"{fname}: expected {rule}, got {got}"


def test_unscheduled_default_has_no_parallel_loops(built):
    """The check above can fail: the plain legalized functions have no parallel loop."""
    _, _, _, _, _, _ = built["conv3x3_pad"]
    mod, _, _ = _build(*GRAPHS["conv3x3_pad"][:2])
    with TARGET:
        legal = tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(TARGET) + cpu_generic.legalize_passes(TARGET)
        )(mod)
    funcs = [f for _, f in legal.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert funcs and all(_parallel_loops(f) == 0 for f in funcs)


def test_rule_failure_falls_back():
    """A rule that raises is skipped; an unmatched function still gets outer-loop parallel."""
    mod, _, _ = _build(*GRAPHS["pools"][:2])
    with TARGET:
        legal = tvm.transform.Sequential(
            cpu_generic.library_dispatch_passes(TARGET) + cpu_generic.legalize_passes(TARGET)
        )(mod)

    class Broken(Rule):
        name = "broken"

        def schedule(self, func, target):
            raise RuntimeError("boom")  # what TVM raises for a schedule that does not fit

    funcs = [(gv, func) for gv, func in legal.functions_items() if isinstance(func, tirx.PrimFunc)]
    assert funcs
    for gv, func in funcs:
        fallback = ScheduleKernels([Broken(), ParallelOnly()], TARGET)
        new = fallback(tvm.IRModule({gv: func}))[gv.name_hint]
        assert fallback.applied == {gv.name_hint: "parallel-only"}, gv.name_hint
        assert _parallel_loops(new) > 0
        assert new.attrs.get("tirx.is_scheduled", False)
        none = ScheduleKernels([Broken()], TARGET)
        new = none(tvm.IRModule({gv: func}))[gv.name_hint]
        assert none.applied == {gv.name_hint: None} and new.same_as(func)
    assert [type(rule) for rule in RULES] == [Conv2D, Dense, Window, Generic, ParallelOnly]


def test_relax_build_accepts_pass_and_noalias_fix():
    """relax.build takes the Pass; every PrimFunc of the result is no-alias (see
    mark_trivial_noalias), including VMShapeLower's shape_func."""
    mod, _, _ = _build(*GRAPHS["conv3x3_pad"][:2])
    with TARGET:
        lowered = cpu_pipeline(TARGET)(mod)
    funcs = {gv.name_hint: f for gv, f in lowered.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert "shape_func" in funcs
    assert all(f.attrs.get("tirx.noalias", False) for f in funcs.values())
