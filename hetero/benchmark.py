"""Measure, in one process and one run, each device alone on the whole batch and then the split.

    python -m hetero.benchmark --network resnet-50 --device cpu,gpu0 --batch 100

prints per device img/s (and PyTorch eager fp32's on the same device and batch, where PyTorch is
installed), the split's img/s, the ideal (the sum of the devices' throughputs), split/ideal and
split/best-single, and appends the same as a markdown table to BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .cli import _Parser, _batch_list, _positive_int, _run
from .devices import DEFAULT_PRECISION, PRECISIONS, Device, parse_devices, with_precision
from .execute import Engine, load_engine, run_split
from .inference import (DEFAULT_BUDGET_S, DEFAULT_TABLE, ensure_profiles, learn_company, plan, reserve_cores,
                        share_limits)
from .models import Network, get_network
from .profile import SEED_BATCHES
from .table import ProfileTable


@dataclass
class DeviceResult:
    device: Device
    alone_img_s: float
    torch_img_s: float | None
    share: int
    predicted_s: float  # for its share in the split
    split_s: float  # measured for its share in the split, median
    split_upload_s: float  # of which copying its inputs to the device, median


@dataclass
class BenchmarkResult:
    network: str
    batch: int
    devices: list[DeviceResult]
    split_img_s: float
    partition_us: float

    @property
    def ideal_img_s(self) -> float:
        return sum(d.alone_img_s for d in self.devices)

    @property
    def best_single_img_s(self) -> float:
        return max(d.alone_img_s for d in self.devices)


def interleaved_medians(runs: Sequence[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median wall seconds of each run, timed in rounds that alternate the runs so drift hits all alike."""
    times: list[list[float]] = [[] for _ in runs]
    for round_index in range(warmup + repeats):
        for run, kept in zip(runs, times):
            start = time.perf_counter()
            run()
            if round_index >= warmup:
                kept.append(time.perf_counter() - start)
    return [statistics.median(kept) for kept in times]


def torch_run(network: Network, device: Device, inputs: np.ndarray) -> Callable[[], object] | None:
    """One PyTorch eager pass of the same architecture on the same device in the device's precision,
    or None without torch."""
    try:
        import torch

        from .torch_models import torch_model
    except ImportError:
        return None
    model = torch_model(network.name)
    if model is None or (device.kind == "cuda" and not torch.cuda.is_available()) or device.kind == "opencl":
        return None
    target = torch.device("cpu" if device.kind == "cpu" else f"cuda:{device.index}")
    if device.kind == "cpu":
        torch.set_num_threads(device.threads or torch.get_num_threads())
    dtype = torch.float16 if device.precision == "fp16" else torch.float32
    model = model.eval().to(target, dtype)
    batch = torch.from_numpy(inputs)
    # PyTorch's default lets cuDNN's convolutions (not matmuls) round to TF32; hetero's fp32 is
    # exact fp32 and its tf32 rounds both, so each is compared with PyTorch doing the same.
    tf32 = device.precision == "tf32"

    def run() -> None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.inference_mode():
            model(batch.to(target, dtype)).float().cpu()

    return run


def benchmark(
    network: str,
    devices: Sequence[Device],
    batch: int,
    table: ProfileTable,
    repeats: int = 5,
    warmup: int = 1,
    profile_batches: Sequence[int] = SEED_BATCHES,
    budget_s: float = DEFAULT_BUDGET_S,
    with_torch: bool = True,
) -> BenchmarkResult:
    """Each device alone on the whole batch, PyTorch on each device, then the split: all in one process."""
    net = get_network(network)
    devices = reserve_cores(devices)
    engines: list[Engine] = [load_engine(net, device) for device in devices]
    profiles, _ = ensure_profiles(engines, table, profile_batches, budget_s=budget_s)
    inputs = net.random_input(batch)
    limits = share_limits(profiles, devices)  # chunked as Inference.py runs them
    # One untimed split teaches the table each device's slowdown in company, as Inference.py's runs do,
    # so the timed split is the plan repeated runs of Inference.py settle on.
    shares, predicted, _ = plan(profiles, batch)
    learn_company(table, profiles, run_split(engines, inputs, shares, predicted, limits)[1])
    shares, predicted, partition_s = plan(profiles, batch)
    idle = [0.0] * len(engines)

    def alone(i: int) -> Callable[[], object]:
        whole = [batch if j == i else 0 for j in range(len(engines))]
        return lambda: run_split(engines, inputs, whole, idle, limits)

    split_walls: list[list[float]] = [[] for _ in engines]
    split_uploads: list[list[float]] = [[] for _ in engines]

    def split() -> None:
        _, results, _ = run_split(engines, inputs, shares, predicted, limits)
        for walls, uploads, result in zip(split_walls, split_uploads, results):
            walls.append(result.wall_s)
            uploads.append(result.timing.h2d_s if result.timing else 0.0)

    runs = [alone(i) for i in range(len(engines))] + [split]
    torch_runs = [torch_run(net, d, inputs) if with_torch else None for d in devices]
    timed = interleaved_medians(runs + [r for r in torch_runs if r], repeats, warmup)
    torch_seconds = iter(timed[len(runs):])
    results = [
        DeviceResult(engine.device, batch / seconds, batch / next(torch_seconds) if torch else None, share,
                     predicted_s, statistics.median(walls[warmup:]), statistics.median(uploads[warmup:]))
        for engine, seconds, torch, share, predicted_s, walls, uploads in zip(
            engines, timed, torch_runs, shares, predicted, split_walls, split_uploads)
    ]
    return BenchmarkResult(net.name, batch, results, batch / timed[len(engines)], partition_s * 1e6)


def format_markdown(result: BenchmarkResult) -> str:
    rows = [
        [
            d.device.name,
            d.device.hardware,
            d.share,
            f"{d.predicted_s * 1e3:.1f}" if d.share else "-",
            f"{d.split_s * 1e3:.1f} ({d.split_upload_s * 1e3:.1f})" if d.share else "-",
            f"{d.alone_img_s:.1f}",
            f"{d.torch_img_s:.1f}" if d.torch_img_s else "-",
            f"{d.alone_img_s / d.torch_img_s:.2f}" if d.torch_img_s else "-",
        ]
        for d in result.devices
    ]
    rows.append(["split", "", result.batch, "", f"{result.batch / result.split_img_s * 1e3:.1f}",
                 f"{result.split_img_s:.1f}", "", ""])
    table = tabulate(
        rows,
        headers=["device", "hardware", "share", "predicted ms", "split ms (upload)", "hetero img/s", "PyTorch img/s",
                 "hetero/PyTorch"],
        tablefmt="github",
    )
    summary = (
        f"ideal (sum of devices) {result.ideal_img_s:.1f} img/s; split/ideal "
        f"{result.split_img_s / result.ideal_img_s:.2f}; split/best-single "
        f"{result.split_img_s / result.best_single_img_s:.2f}; partitioning {result.partition_us:.0f} us"
    )
    return f"{table}\n\n{summary}"


def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m hetero.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", required=True, help="one or more networks, comma-separated")
    parser.add_argument("--device", default="cpu", help="comma-separated devices, e.g. cpu,gpu0")
    parser.add_argument("--batch", type=_batch_list, required=True, help="one or more batch sizes, comma-separated")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--profile-batches", type=_batch_list, default=list(SEED_BATCHES))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic (default {DEFAULT_PRECISION}): fp32, tf32 or fp16")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"), help="append results here")
    parser.add_argument("--machine", default=platform.node(), help="machine name for BENCHMARKS.md")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    devices = with_precision(parse_devices(args.device), args.precision)
    table = ProfileTable.load(args.table, create=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m hetero.benchmark " + shlex.join(argv)
    arithmetic = ", ".join(f"{d.name} {d.precision}" for d in devices)
    sections = []
    for network in args.network.split(","):
        for batch in args.batch:
            result = benchmark(network, devices, batch, table, args.repeats, args.warmup, args.profile_batches,
                               args.budget, with_torch=not args.no_torch)
            text = format_markdown(result)
            print(f"\n{network}, batch {batch}, devices {args.device}\n{text}", flush=True)
            sections.append(f"#### {network}, batch {batch}, `{args.device}` ({arithmetic})\n\n{text}\n")
    with open(args.markdown, "a", encoding="utf-8") as out:
        out.write(f"\n### {args.machine}, {stamp}\n\n`{command}`\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(_run(main, None))
