"""TVM on one CUDA GPU: the default pipeline vs hetero's gpu_pipeline (fp32, tf32, fp16) and its variants.

For each network: compiles every TVM variant (in parallel worker processes), checks each one's
outputs against the default pipeline's (same weights, same input), times every variant, and prints
one table with img/s, the ratio to TVM's default pipeline and the compile times. This is for work on
hetero's GPU schedules; how hetero stands against the frameworks users run (PyTorch eager and
torch.compile, ONNX Runtime, OpenVINO) is measured by `python -m hetero.benchmark`, the one home of
those baselines.

Run from the repository root, on a machine with a CUDA GPU and TVM::

    python -m benchmarks.gpu_engine                      # resnet-50, mobilenet, vgg-16 at batch 64
    python -m benchmarks.gpu_engine --networks resnet-50 --batch 128 --variants fp16
    python -m benchmarks.gpu_engine --compile-only       # no GPU needed: just build everything

A variant that fails to build or run prints its error and the run goes on.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _lean_hetero() -> None:
    """Make ``hetero.models`` / ``hetero.schedules.cuda`` importable even
    where the package's own ``__init__`` cannot be (it pulls in psutil, tabulate, tqdm, ...)."""
    try:
        import hetero  # noqa: F401
    except ImportError:
        import types

        package = types.ModuleType("hetero")
        package.__path__ = [str(ROOT / "hetero")]
        sys.modules["hetero"] = package


_lean_hetero()  # also runs in the compile workers, which import this module afresh

VARIANTS = {  # name -> (pipeline, precision, gpu_pipeline keyword arguments)
    "tvm-default": ("default", "fp32", {}),
    "hetero-fp32": ("hetero", "fp32", {}),
    "hetero-fp32-nopipe": ("hetero", "fp32", {"software_pipeline": False}),
    "hetero-tf32": ("hetero", "tf32", {}),
    "hetero-tf32-sync": ("hetero", "tf32", {"async_copy": False}),
    "hetero-tf32-mma": ("hetero", "tf32", {"use_wgmma": False}),
    "hetero-fp16": ("hetero", "fp16", {}),
    "hetero-fp16-mma": ("hetero", "fp16", {"use_wgmma": False}),
    "hetero-fp16-sync": ("hetero", "fp16", {"async_copy": False}),
    "hetero-fp16-percall": ("hetero", "fp16", {"weights_once": False}),
    "hetero-fp32-i64": ("hetero", "fp32", {"narrow_index": False}),
    "hetero-tf32-i64": ("hetero", "tf32", {"narrow_index": False}),
    "hetero-fp16-i64": ("hetero", "fp16", {"narrow_index": False}),
}
VARIANT_ALIASES = {"default": "tvm-default", "fp32": "hetero-fp32", "fp32-nopipe": "hetero-fp32-nopipe",
                   "tf32": "hetero-tf32", "tf32-sync": "hetero-tf32-sync", "tf32-mma": "hetero-tf32-mma",
                   "fp16": "hetero-fp16", "fp16-mma": "hetero-fp16-mma",
                   "fp16-sync": "hetero-fp16-sync", "fp16-percall": "hetero-fp16-percall",
                   "fp32-i64": "hetero-fp32-i64", "tf32-i64": "hetero-tf32-i64", "fp16-i64": "hetero-fp16-i64"}


# ------------------------------------------------------------------------------------ compile


def cuda_target(arch: str):
    """The target of issue 4 for an ``sm_XX`` GPU, host code for this CPU (as hetero.devices: sm_90
    compiled as sm_90a)."""
    import platform

    import tvm

    from hetero.schedules.cuda.wgmma import with_wgmma

    host = tvm.target.Target({"kind": "llvm", "mtriple": f"{platform.machine()}-linux-gnu",
                              "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return with_wgmma(tvm.target.Target(
        {"kind": "cuda", "arch": arch, "max_threads_per_block": 1024,
         "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "max_num_threads": 1024},
        host,
    ))


def compile_variant(network: str, variant: str, arch: str, out_dir: str) -> tuple[str | None, float, str | None]:
    """Build one variant and export it; (library path, seconds, error).  Runs in a worker."""
    try:
        from tvm import relax

        from hetero.models import get_network
        from hetero.schedules.cuda.pipeline import gpu_pipeline, tir_pipeline

        target = cuda_target(arch)
        net = get_network(network)
        kind, precision, options = VARIANTS[variant]
        pipeline = (relax.get_default_pipeline(target) if kind == "default"
                    else gpu_pipeline(target, precision, **options))
        start = time.perf_counter()
        executable = relax.build(net.module, target, relax_pipeline=pipeline,
                                 tir_pipeline=tir_pipeline(precision, target) if kind == "hetero" else "default")
        path = os.path.join(out_dir, f"{network}-{variant}.so")
        executable.export_library(path)
        return path, time.perf_counter() - start, None
    except Exception:
        return None, 0.0, _short_error()


def _short_error() -> str:
    lines = [line for line in traceback.format_exc().strip().splitlines() if line.strip()]
    # TVM errors end with the interesting line; keep a little context
    return " | ".join(lines[-3:])[-600:]


# ------------------------------------------------------------------------------------ timing


@dataclass
class Result:
    network: str
    variant: str
    compile_s: float | None = None
    ms: float | None = None  # median milliseconds per batch
    spread: float | None = None  # (max - min) / median over the samples
    rel_err: float | None = None  # vs tvm-default's output
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def time_tvm(path: str, network: str, batch: int, budget_s: float, kernels: int = 0):
    """(output of the first call, median s, spread) for the exported library at ``path``; with
    ``kernels``, also print that many of its slowest kernels."""
    import numpy as np
    import tvm
    from tvm import relax

    from hetero.compile import module_weights
    from hetero.models import get_network
    from hetero.schedules.cuda.indices import recorded_max_batch
    from hetero.timer import Timer

    net = get_network(network)
    dev = tvm.cuda(0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(path), dev)
    limit = recorded_max_batch(vm)
    if limit is not None and batch > limit:
        raise ValueError(f"batch {batch} is above the {limit} that this module's int32 indices hold")
    main = vm["main"]
    x = tvm.runtime.tensor(net.random_input(batch, seed=0), dev)
    weights = module_weights(vm, [tvm.runtime.tensor(p, dev) for p in net.params])
    out = main(x, *weights).numpy().astype(np.float64)
    run = functools.partial(main, x, *weights)
    timed = Timer(run, sync=dev.sync).adaptive(budget_s)
    seconds, spread = timed.median, timed.spread
    if kernels:
        print_kernel_times(vm, run, dev.sync, kernels)
    del run, vm, weights, x
    return out, seconds, spread


def print_kernel_times(vm, run, sync, top: int) -> None:
    """One call of ``run`` with the device synchronised around every kernel the VM launches: the
    ``top`` kernels by time, with their argument shapes (the synchronisation adds a few us each)."""
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}
    shapes: dict[str, list] = {}
    started: list[float] = []

    def instrument(_func, name, before, _ret, *args):
        sync()
        if before:
            started.append(time.perf_counter())
            shapes[name] = [tuple(a.shape) for a in args if hasattr(a, "shape")]
        else:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started.pop()
            calls[name] = calls.get(name, 0) + 1
        return 0

    vm.set_instrument(instrument)
    run()
    vm.set_instrument(None)
    kernels = {name: s for name, s in seconds.items() if not name.startswith("vm.builtin")}
    total = sum(kernels.values())
    print(f"    kernels, synchronised one by one: {total * 1e3:.2f} ms in all")
    for name, s in sorted(kernels.items(), key=lambda item: -item[1])[:top]:
        print(f"    {s * 1e3:7.3f} ms {100 * s / total:5.1f}% x{calls[name]:<3d} {name} {shapes[name]}")


# ------------------------------------------------------------------------------------ report


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(results: list[Result], batch: int) -> None:
    by_key = {(r.network, r.variant): r for r in results}
    width = max([len("network")] + [len(r.network) for r in results])
    header = (f"{'network':<{width}} {'variant':<18} {'compile s':>9} {'ms/batch':>9} {'img/s':>8} "
              f"{'spread':>6} {'/default':>8} {'rel err':>9}")
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        ips = batch / (r.ms / 1e3) if r.ms else None
        default = by_key.get((r.network, "tvm-default"))
        ratio = f"{default.ms / r.ms:.2f}x" if r.ms and default is not None and default.ms else "-"
        spread = "-" if r.spread is None else f"{100 * r.spread:.0f}%"
        print(f"{r.network:<{width}} {r.variant:<18} {_fmt(r.compile_s, '.1f'):>9} {_fmt(r.ms, '.2f'):>9} "
              f"{_fmt(ips, '.0f'):>8} {spread:>6} {ratio:>8} {_fmt(r.rel_err, '.1e'):>9}")
        if r.error:
            print(f"{'':<{width}} {'':<18} ERROR: {r.error}")
    print(f"\nimg/s at batch {batch}.  /default: img/s over tvm-default's (TVM's own pipeline).  rel err = "
          "max|out - ref| / max|ref| against tvm-default's output (same weights, same input).  spread = "
          "(max - min) / median of the timing samples.  compile s: relax.build + export_library.  Against "
          "PyTorch, ONNX Runtime and OpenVINO: python -m hetero.benchmark.")


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="resnet-50,mobilenet,vgg-16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default="default,fp32,tf32,fp16",
                        help="TVM variants, comma separated: default (TVM's pipeline), fp32, fp32-nopipe "
                             "(hetero's, without software pipelining), tf32, fp16, tf32-sync and fp16-sync "
                             "(without cp.async tile loads), tf32-mma and fp16-mma (without the wgmma convs of "
                             "sm_90), fp16-percall (weights cast and transposed on "
                             "every call), fp32-i64, tf32-i64 and fp16-i64 (int64 index arithmetic)")
    parser.add_argument("--jobs", type=int, default=min(6, os.cpu_count() or 1),
                        help="parallel compile processes (1: compile in this process)")
    parser.add_argument("--time-budget", type=float, default=2.0, help="seconds of timing per variant")
    parser.add_argument("--compile-only", action="store_true", help="build (and report) only; no GPU needed")
    parser.add_argument("--arch", default=None, help="sm_XX; default: GPU 0's")
    parser.add_argument("--kernels", type=int, default=0, metavar="N",
                        help="also print each variant's N slowest kernels (one call, synchronised per kernel)")
    parser.add_argument("--describe", action="store_true",
                        help="also print the rule and tile hetero's pipeline gives every GEMM kernel")
    args = parser.parse_args(argv)

    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    variants = [VARIANT_ALIASES.get(v.strip(), v.strip()) for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANT_ALIASES)}")
    if "tvm-default" in variants:  # the reference for the error check comes first
        variants.remove("tvm-default")
        variants.insert(0, "tvm-default")

    wall = time.perf_counter()
    import tvm

    arch = args.arch
    if arch is None:
        if tvm.cuda(0).exist:
            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        elif args.compile_only:
            arch = "sm_90"
        else:
            print("no CUDA GPU visible to TVM (use --compile-only to only build)", file=sys.stderr)
            return 1
    print(f"TVM {tvm.__version__}, target arch {arch}, batch {args.batch}, networks {networks}, "
          f"variants {variants}")
    if tvm.cuda(0).exist:
        print(f"GPU 0: {tvm.cuda(0).device_name}")

    if args.describe:
        from hetero.models import get_network
        from hetero.schedules.cuda.pipeline import describe_schedules
        from hetero.schedules.cuda.tiles import TensorCoreConfig

        target = cuda_target(arch)
        for network in networks:
            for variant in variants:
                kind, precision, _ = VARIANTS[variant]
                if kind != "hetero":
                    continue
                print(f"\n{network} {variant}: kernel, rule, GEMM M (batch 64) x N x K, tile")
                try:
                    for k in describe_schedules(get_network(network).module, target, precision):
                        if k.tile is not None or k.rule not in ("dlight.Fallback",):
                            tile = "" if k.tile is None else f"{k.tile.bm}x{k.tile.bn}, " + (
                                f"{k.tile.tk} K steps" if isinstance(k.tile, TensorCoreConfig) else f"K {k.tile.bk}")
                            shape = f"{k.m}x{k.n}x{k.k}" if k.m is not None else ""
                            print(f"  {k.name:<44} {k.rule:<18} {shape:<18} {tile}")
                except Exception:
                    print(f"  describe failed: {_short_error()}")

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="hetero-gpu-bench-") as out_dir:
        # ---- compile everything first, in parallel
        jobs = [(n, v) for n in networks for v in variants]
        compiled: dict[tuple[str, str], tuple[str | None, float, str | None]] = {}
        print(f"\ncompiling {len(jobs)} modules with {args.jobs} process(es) ...", flush=True)
        if args.jobs > 1 and len(jobs) > 1:
            try:
                ctx = multiprocessing.get_context("spawn")
                with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
                    futures = {pool.submit(compile_variant, n, v, arch, out_dir): (n, v) for n, v in jobs}
                    for future in cf.as_completed(futures):
                        key = futures[future]
                        try:
                            compiled[key] = future.result()
                        except Exception:  # a worker died
                            compiled[key] = (None, 0.0, _short_error())
                        path, seconds, error = compiled[key]
                        print(f"  {key[0]} {key[1]}: " + (f"{seconds:.1f} s" if error is None else f"FAILED {error}"),
                              flush=True)
            except Exception:
                print(f"  process pool failed ({_short_error()}); compiling in this process", flush=True)
        for key in jobs:
            if key not in compiled or (compiled[key][2] is not None and "BrokenProcessPool" in compiled[key][2]):
                compiled[key] = compile_variant(key[0], key[1], arch, out_dir)
                path, seconds, error = compiled[key]
                print(f"  {key[0]} {key[1]}: " + (f"{seconds:.1f} s" if error is None else f"FAILED {error}"),
                      flush=True)
        print(f"compiled in {time.perf_counter() - wall:.0f} s (wall, including startup)", flush=True)

        # ---- run, one network at a time
        for network in networks:
            reference = None
            for variant in variants:
                path, seconds, error = compiled[(network, variant)]
                result = Result(network, variant, compile_s=seconds if error is None else None, error=error)
                results.append(result)
                if error is not None or args.compile_only:
                    continue
                try:
                    out, secs, spread = time_tvm(path, network, args.batch, args.time_budget, args.kernels)
                    result.ms, result.spread = secs * 1e3, spread
                    if variant == "tvm-default":
                        reference = out
                    elif reference is not None:
                        import numpy as np

                        result.rel_err = float(np.abs(out - reference).max() / np.abs(reference).max())
                except Exception:
                    result.error = _short_error()
                print(f"  {network} {variant}: "
                      + (f"{result.ms:.2f} ms/batch, rel err {_fmt(result.rel_err, '.1e')}" if result.ms
                         else f"FAILED {result.error}"), flush=True)

    print_table(results, args.batch)
    print(f"total {time.perf_counter() - wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
