"""Default cpu_generic pipeline vs hetero.schedules.cpu.pipeline.cpu_pipeline, img/s.

For work on hetero's CPU schedules: single layers and whole networks, TVM's default pipeline against
hetero's. How hetero stands against the frameworks users run (PyTorch eager and torch.compile, ONNX
Runtime, OpenVINO) is measured by `python -m hetero.benchmark`, the one home of those baselines.

Networks are hetero's engines' modules (hetero.compile.compile_network: built once for a symbolic
batch, kept in hetero's compile cache; "compile" is 0 s when a module came from there).

    python -m benchmarks.cpu_schedule                       # layers + networks, batch 1 and 8
    python -m benchmarks.cpu_schedule --networks resnet-50,mobilenet,vgg-16 --no-layers \
        --default-networks none --wait-quiet 120
    python -m benchmarks.cpu_schedule --threads 1 --clock cpu ...   # busy machine

The unscheduled default pipeline is slow (resnet-18: ~1.6 s per image), so whole
networks are compiled with it only when listed in --default-networks.  Each
number is the median of --repeats timed calls after one warm-up call; the
minimum is printed too because this 2-core machine is shared.  On a busy
machine use ``--threads 1 --clock cpu`` (process CPU time): wall-clock
numbers with 2 threads swing by 2-5x when another process holds a core,
since every parallel region waits for its slowest thread.
TVM_NUM_THREADS is set to --threads before TVM starts its thread pool: TVM's
default on x86 is half the logical CPUs (it assumes hyper-threading), i.e. a
single thread on this 2-vCPU machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # hetero imports TVM, which must start after TVM_NUM_THREADS is set
    from hetero.timer import Timed

ROOT = Path(__file__).resolve().parent.parent

LAYERS = {
    # name: (C, K, H, kernel, stride, groups)
    "conv3x3 64->64 56x56": (64, 64, 56, 3, 1, 1),
    "conv3x3 128->128 28x28": (128, 128, 28, 3, 1, 1),
    "conv3x3 256->256 14x14": (256, 256, 14, 3, 1, 1),
    "conv3x3 512->512 7x7": (512, 512, 7, 3, 1, 1),
    "conv1x1 256->64 56x56": (256, 64, 56, 1, 1, 1),
    "conv1x1 32->64 112x112": (32, 64, 112, 1, 1, 1),
    "conv1x1 64->128 56x56": (64, 128, 56, 1, 1, 1),
    "conv1x1 128->128 56x56": (128, 128, 56, 1, 1, 1),
    "conv3x3/2 128->256 28x28": (128, 256, 28, 3, 2, 1),
    "conv7x7/2 3->64 224x224": (3, 64, 224, 7, 2, 1),
    "dwconv3x3 256 28x28": (256, 256, 28, 3, 1, 256),
    "dwconv3x3/2 128 56x56": (128, 128, 56, 3, 2, 128),
}


def _cpu_ticks() -> float:
    """Busy CPU seconds of the whole machine (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0
    busy = sum(fields) - fields[3] - fields[4]  # minus idle, iowait
    return busy / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Share of the machine's CPU used by *other* processes while measuring.

    This machine is shared; a number measured while another process held a
    core is flagged instead of silently reported.
    """

    def __enter__(self):
        self.wall, self.busy, t = time.perf_counter(), _cpu_ticks(), os.times()
        self.own = t.user + t.system + t.children_user + t.children_system
        return self

    def __exit__(self, *exc):
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system - self.own
        wall = time.perf_counter() - self.wall
        foreign = max(_cpu_ticks() - self.busy - own, 0.0)
        self.share = foreign / max(wall * (os.cpu_count() or 1), 1e-9)
        return False


def wait_quiet(max_wait: float, probe: float = 2.0) -> bool:
    """Wait (up to max_wait s) until other processes use < BUSY of the CPUs for `probe` s."""
    deadline = time.perf_counter() + max_wait
    while True:
        with ForeignLoad() as load:
            time.sleep(probe)
        if load.share < BUSY or time.perf_counter() > deadline:
            return load.share < BUSY


@dataclass
class VariantRun:
    """One variant timed: its calls, its build, and how busy other processes kept the machine meanwhile."""

    timed: Timed
    compile_s: float = 0.0
    foreign: float = 0.0  # share of the CPUs other processes used meanwhile

    @property
    def median(self) -> float:
        return self.timed.median

    @property
    def best(self) -> float:
        return min(self.timed.seconds)


def _layer_module(C, K, H, k, stride, groups):
    import tvm
    from tvm import relax

    n = tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, C, H, H), "float32"))
    w = relax.Var("w", relax.TensorType((K, C // groups, k, k), "float32"))
    b = relax.Var("b", relax.TensorType((K, 1, 1), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=k // 2, groups=groups))
            y = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(y, b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    import numpy as np

    rng = np.random.default_rng(0)
    params = [rng.standard_normal((K, C // groups, k, k)).astype("float32") * 0.1,
              rng.standard_normal((K, 1, 1)).astype("float32")]
    return bb.get(), params, (C, H, H)


CLOCK = time.perf_counter
WAIT_QUIET = 0.0  # seconds to wait for a quiet machine before each measurement


def _time_module(mod, params, sample_shape, batch, pipeline, repeats, target) -> tuple[VariantRun, object]:
    """Build ``mod`` (TVM's default pipeline where ``pipeline`` is None) and time it at ``batch``."""
    from tvm import relax

    t0 = time.perf_counter()
    ex = relax.build(mod, target, relax_pipeline=pipeline) if pipeline else relax.build(mod, target)
    compile_s = time.perf_counter() - t0
    timing, out = _time_executable(ex, params, sample_shape, batch, repeats)
    timing.compile_s = compile_s
    return timing, out


def _time_executable(executable, params, sample_shape, batch, repeats) -> tuple[VariantRun, object]:
    """Median-ready timings of ``repeats`` calls at ``batch`` after a warm-up, and the output.  The
    weights go through the module's ``main_transform_params`` first, as an engine's do."""
    import numpy as np
    import tvm
    from tvm import relax

    from hetero.compile import module_weights
    from hetero.timer import Timer

    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = np.random.default_rng(1).standard_normal((batch, *sample_shape)).astype("float32")
    args = [tvm.runtime.tensor(x)] + module_weights(vm, [tvm.runtime.tensor(np.asarray(p)) for p in params])
    out = vm["main"](*args).numpy()  # warm-up
    if WAIT_QUIET:
        wait_quiet(WAIT_QUIET)
    with ForeignLoad() as load:
        timed = Timer(lambda: vm["main"](*args), clock=CLOCK).timeit(repeats, warmup=0)
    return VariantRun(timed, foreign=load.share), out


def _compile_cached(network: str) -> float:
    """hetero's CPU module for ``network``, from the compile cache or built into it; seconds spent
    building (0 when cached).  Runs in a worker process with ``--jobs``."""
    sys.path.insert(0, str(ROOT))
    from hetero.compile import compile_network
    from hetero.devices import parse_devices
    from hetero.models import get_network

    return compile_network(get_network(network), parse_devices("cpu")[0]).seconds


def _compile_all(networks: list[str], jobs: int) -> dict[str, float]:
    """Fill the compile cache for ``networks``, ``jobs`` builds at a time."""
    if jobs <= 1:
        return {}
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(networks, pool.map(_compile_cached, networks)))


BUSY = 0.10  # flag a number when other processes used more than this share of the CPUs


def _fmt(batch: int, t: VariantRun | None) -> str:
    if t is None:
        return f"{'-':>18s}"
    mark = "*" if t.foreign > BUSY else " "
    return f"{batch / t.median:8.1f} ({batch / t.best:6.1f}){mark}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", default="resnet-18,resnet-50,mobilenet,vgg-16")
    ap.add_argument("--default-networks", default="resnet-18",
                    help="networks also compiled with the (slow) unscheduled default pipeline")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time, robust on a shared machine; needs --threads 1")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each measurement wait up to this long for other processes "
                         "to leave the CPUs alone (shared machine)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="build the networks' modules in this many processes first (into hetero's compile cache)")
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu measures process CPU time: use it with --threads 1")
    global CLOCK, WAIT_QUIET  # noqa: PLW0603
    WAIT_QUIET = args.wait_quiet
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool exists
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import tvm  # noqa: F401

    from hetero.devices import cpu_target
    from hetero.schedules.cpu.pipeline import cpu_pipeline

    target = cpu_target()
    pipeline = cpu_pipeline(target)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"target {target}  TVM threads {args.threads}  repeats {args.repeats}  clock {args.clock}")
    print("img/s as median (best);  default = relax.backend.cpu_generic default pipeline;  "
          f"* = other processes used >{BUSY:.0%} of the CPUs meanwhile (number unreliable)")
    header = f"{'':34s} {'batch':>5s} {'default':>18s} {'cpu_pipeline':>18s} {'speedup':>8s}"

    if not args.no_layers:
        print("\n== single layers (conv + bias + relu, symbolic batch) ==")
        print(header + f" {'GFLOP/s':>8s}")
        for name in args.layers.split(","):
            C, K, H, k, stride, groups = LAYERS[name]
            mod, params, shape = _layer_module(C, K, H, k, stride, groups)
            ho = (H + 2 * (k // 2) - k) // stride + 1
            flops = 2 * K * ho * ho * (C // groups) * k * k
            for batch in batches:
                reps = max(1, args.repeats if batch == 1 else args.repeats // 2)
                base, ref = _time_module(mod, params, shape, batch, None, 1, target)
                sched, out = _time_module(mod, params, shape, batch, pipeline, reps, target)
                err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
                flag = "" if err < 1e-4 else f"  MISMATCH rel err {err:.1e}"
                print(f"{name:34s} {batch:5d} {_fmt(batch, base)} {_fmt(batch, sched)} "
                      f"{base.median / sched.median:7.1f}x {flops * batch / sched.median / 1e9:8.1f}{flag}",
                      flush=True)

    nets = [n for n in args.networks.split(",") if n]
    if nets:
        from hetero.compile import compile_network
        from hetero.devices import parse_devices
        from hetero.models import get_network

        print("\n== networks ==")
        build_seconds = _compile_all(nets, args.jobs)
        print(header + f" {'compile':>8s}")
        defaults = set(args.default_networks.split(","))
        for net_name in nets:
            net = get_network(net_name)
            compiled = compile_network(net, parse_devices("cpu")[0])
            build_s = build_seconds.get(net_name, compiled.seconds)
            for batch in batches:
                base = ref = None
                if net_name in defaults:
                    base, ref = _time_module(net.module, net.params, net.input_shape, batch, None, 1, target)
                sched, out = _time_executable(compiled.executable, net.params, net.input_shape, batch,
                                              args.repeats)
                flag = ""
                if ref is not None:
                    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)
                    flag = "" if err < 1e-4 else f"  MISMATCH rel err {err:.1e}"
                speed = f"{base.median / sched.median:7.1f}x" if base else f"{'-':>8s}"
                print(f"{net_name:34s} {batch:5d} {_fmt(batch, base)} {_fmt(batch, sched)} {speed} "
                      f"{build_s:7.1f}s{flag}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
