"""Where hetero stands on this machine: each device with every engine installed, the best baseline a user
could run there, hetero's choice, and the split, all measured side by side in one process.

    python -m hetero.benchmark --network resnet-50 --device cpu,gpu0 --batch 100

Every run is timed the same way, host array in and host array out (copies included), in rounds that
alternate the runs so that drift hits all alike; each figure is a median. The baselines are the
engines a user already has, run as their own guides say (hetero.engines: PyTorch eager with
channels_last and cudnn.benchmark under inference_mode, torch.compile, ONNX Runtime with its default
graph optimisations and the same threads), on the same network with the same weights. TVM's engine
is reported on its own too, so that its gap stays visible. The result replaces this machine's section
of BENCHMARKS.md.
"""

from __future__ import annotations

import datetime
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .cli import Parser, batch_list, positive_int, run_command
from .devices import DEFAULT_PRECISION, PRECISIONS, Device, parse_devices, with_precision
from .engines import Engine, load_engine
from .execute import run_split
from .inference import (
    DEFAULT_BUDGET_S,
    DEFAULT_TABLE,
    choose_engines,
    ensure_profiles,
    learn_company,
    plan,
    reserve_cores,
    share_limits,
)
from .models import get_network
from .profile import SEED_BATCHES
from .selection import AUTO, candidate_engines, parse_engine_choice
from .stream import stream
from .table import Profile, ProfileTable
from .timer import Timer, interleave

BASELINES = ("onnxruntime", "openvino", "torch", "torch-compile")  # what users run without hetero


@dataclass
class DeviceResult:
    device: Device
    engine_img_s: dict[str, float]  # every engine measured alone on the whole batch
    chosen: str  # the engine hetero's plan runs on this device
    share: int
    predicted_s: float  # for its share in the split
    split_s: float  # measured for its share in the split, median

    @property
    def hetero_img_s(self) -> float:
        return self.engine_img_s[self.chosen]

    @property
    def best_baseline(self) -> tuple[str, float] | None:
        baselines = {name: rate for name, rate in self.engine_img_s.items() if name in BASELINES}
        return max(baselines.items(), key=lambda item: item[1]) if baselines else None


@dataclass
class BenchmarkResult:
    network: str
    batch: int
    devices: list[DeviceResult]
    split_img_s: float
    partition_us: float

    @property
    def ideal_img_s(self) -> float:
        """The sum of the devices' throughputs alone, each with the engine the split runs on it."""
        return sum(d.hetero_img_s for d in self.devices)

    @property
    def best_single_img_s(self) -> float:
        """The best a user gets from one device with its best engine."""
        return max(max(d.engine_img_s.values()) for d in self.devices)


def _alone(engine: Engine, profile: Profile, inputs: np.ndarray) -> Callable[[], object]:
    """The engine running the whole batch as a split of one device runs it (in its calls)."""
    limits = share_limits([profile], [engine.device])
    engine.on_worker(engine.prepare, len(inputs), limits[0]).result()
    return lambda: run_split([engine], inputs, [len(inputs)], [0.0], limits)


def benchmark(
    network: str,
    devices: Sequence[Device],
    batch: int,
    table: ProfileTable,
    repeats: int = 5,
    warmup: int = 1,
    profile_batches: Sequence[int] = SEED_BATCHES,
    budget_s: float = DEFAULT_BUDGET_S,
    engine: str = AUTO,
) -> BenchmarkResult:
    """Each device alone on the whole batch with each engine, then hetero's split: all in one process."""
    net = get_network(network)
    devices = reserve_cores(devices)
    choice = parse_engine_choice(engine, devices)
    options = [[load_engine(net, device, name) for name in candidate_engines(net, device, choice[device.name])]
               for device in devices]
    profiles, _ = ensure_profiles([e for engines in options for e in engines], table, profile_batches,
                                  budget_s=budget_s)
    profiled = iter(profiles)
    pairs = [[(e, next(profiled)) for e in engines] for engines in options]
    engines, chosen = choose_engines(pairs, batch)
    inputs = net.random_input(batch)
    limits = share_limits(chosen, devices)  # chunked as Inference.py runs them
    # One untimed split teaches the table each device's slowdown in company, as Inference.py's runs do,
    # so the timed split is the plan repeated runs of Inference.py settle on.
    shares, predicted, _ = plan(chosen, batch)
    learn_company(table, chosen, run_split(engines, inputs, shares, predicted, limits)[1])
    shares, predicted, partition_s = plan(chosen, batch)
    split_walls: list[list[float]] = [[] for _ in engines]

    def split() -> None:
        _, results, _ = run_split(engines, inputs, shares, predicted, limits)
        for walls, result in zip(split_walls, results):
            walls.append(result.wall_s)

    alone = [_alone(e, p, inputs) for device_pairs in pairs for e, p in device_pairs]
    timed = iter(t.median for t in interleave([Timer(run) for run in alone + [split]], repeats, warmup))
    results = [
        DeviceResult(engine.device, {e.name: batch / next(timed) for e, _ in device_pairs}, engine.name, share,
                     predicted_s, statistics.median(walls[warmup:]))
        for engine, device_pairs, share, predicted_s, walls in zip(engines, pairs, shares, predicted, split_walls)
    ]
    return BenchmarkResult(net.name, batch, results, batch / next(timed), partition_s * 1e6)


@dataclass
class StreamResult:
    network: str
    samples: int
    alone_img_s: dict[str, float]  # each device streaming the whole input by itself
    stream_img_s: float  # every device at once

    @property
    def ideal_img_s(self) -> float:
        return sum(self.alone_img_s.values())


def benchmark_stream(network: str, devices: Sequence[Device], samples: int, table: ProfileTable,
                     profile_batches: Sequence[int] = SEED_BATCHES, budget_s: float = DEFAULT_BUDGET_S,
                     engine: str = AUTO) -> StreamResult:
    """A stream of `samples` random samples from a .npy file into another: each device alone, then all."""
    net = get_network(network)
    devices = reserve_cores(devices)
    options = dict(table=table, profile_batches=profile_batches, budget_s=budget_s, progress=False, engine=engine)
    with tempfile.TemporaryDirectory(prefix="hetero-stream-") as folder:
        source, target = Path(folder) / "inputs.npy", Path(folder) / "outputs.npy"
        inputs = np.lib.format.open_memmap(source, mode="w+", dtype=net.dtype, shape=(samples, *net.input_shape))
        for first in range(0, samples, 1024):  # written in pieces: the input may be larger than memory
            inputs[first : first + 1024] = net.random_input(min(1024, samples - first), seed=first)
        inputs.flush()
        del inputs
        alone = {device.name: stream(net, [device], source, target, **options).throughput for device in devices}
        together = stream(net, devices, source, target, **options).throughput
    return StreamResult(net.name, samples, alone, together)


def format_stream(result: StreamResult) -> str:
    devices = ", ".join(f"{name} {rate:.1f}" for name, rate in result.alone_img_s.items())
    return (f"stream of {result.samples} samples: {result.stream_img_s:.1f} img/s; each device streaming alone "
            f"(img/s): {devices}; stream/ideal {result.stream_img_s / result.ideal_img_s:.2f}")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def format_markdown(result: BenchmarkResult) -> str:
    names = list(dict.fromkeys(name for d in result.devices for name in d.engine_img_s))
    rows = []
    for d in result.devices:
        best = d.best_baseline
        rows.append([
            d.device.name, d.device.hardware, d.device.precision,
            *(f"{d.engine_img_s[name]:.1f}" if name in d.engine_img_s else "-" for name in names),
            f"{best[0]} {best[1]:.1f}" if best else "-",
            d.chosen, _ratio(d.hetero_img_s, best and best[1]), _ratio(d.engine_img_s.get("tvm"), best and best[1]),
            d.share, f"{d.predicted_s * 1e3:.1f}" if d.share else "-", f"{d.split_s * 1e3:.1f}" if d.share else "-",
        ])
    table = tabulate(
        rows,
        headers=["device", "hardware", "precision", *(f"{name} img/s" for name in names), "best baseline img/s",
                 "hetero runs", "hetero/best", "tvm/best", "share", "predicted ms", "split ms"],
        tablefmt="github",
    )
    summary = (
        f"split {result.split_img_s:.1f} img/s; ideal (sum of the devices with hetero's engines) "
        f"{result.ideal_img_s:.1f}; split/ideal {result.split_img_s / result.ideal_img_s:.2f}; "
        f"split/best-single {result.split_img_s / result.best_single_img_s:.2f} (best single: one device with "
        f"its fastest engine, {result.best_single_img_s:.1f}); partitioning {result.partition_us:.0f} us"
    )
    return f"{table}\n\n{summary}"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(path: Path, machine: str, text: str) -> None:
    """Put `text` under "## <machine>" in the page at `path`, replacing that machine's earlier section."""
    page = path.read_text(encoding="utf-8") if path.exists() else BENCHMARKS_HEAD
    sections = re.split(r"(?m)^(?=## )", page)
    heading = f"## {machine}\n"
    kept = [s for s in sections if not s.startswith(heading)]
    path.write_text("".join(kept).rstrip("\n") + f"\n\n{heading}\n{text.strip()}\n", encoding="utf-8")


BENCHMARKS_HEAD = """# Where hetero stands

Written by `python -m hetero.benchmark` (README.md, "Benchmark"): one section per machine, replaced each
time the benchmark runs there. Each device runs the whole batch alone with every engine installed, then
hetero splits the batch over the devices with the engine its plan picked for each; every figure is a
median of rounds that alternate the runs, host array in and host array out. "best baseline" is the
fastest engine a user already has on that device (PyTorch eager and torch.compile, ONNX Runtime,
OpenVINO); "hetero/best" compares hetero's engine there with it, "tvm/best" hetero's own compiler.
How these figures came about: benchmarks/HISTORY.md.
"""


def main(argv: list[str]) -> int:
    parser = Parser(prog="python -m hetero.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", required=True, help="one or more networks, comma-separated")
    parser.add_argument("--device", default="cpu", help="comma-separated devices, e.g. cpu,gpu0")
    parser.add_argument("--batch", type=batch_list, required=True, help="one or more batch sizes, comma-separated")
    parser.add_argument("--engine", default=AUTO, help="engines to measure (as Inference.py's --engine; default auto)")
    parser.add_argument("--stream", type=positive_int, metavar="SAMPLES",
                        help="also stream this many samples from a file, each device alone and all together")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--profile-batches", type=batch_list, default=list(SEED_BATCHES))
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic (default {DEFAULT_PRECISION}): fp32, tf32 or fp16")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"),
                        help="the page whose section for this machine is replaced (default BENCHMARKS.md)")
    parser.add_argument("--machine", default=platform.node(), help="this machine's name in the page")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)

    devices = with_precision(parse_devices(args.device), args.precision)
    table = ProfileTable.load(args.table, create=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m hetero.benchmark " + shlex.join(argv)
    sections = []
    for network in args.network.split(","):
        for batch in args.batch:
            result = benchmark(network, devices, batch, table, args.repeats, args.warmup, args.profile_batches,
                               args.budget, args.engine)
            text = format_markdown(result)
            print(f"\n{network}, batch {batch}, devices {args.device}\n{text}", flush=True)
            sections.append(f"### {network}, batch {batch}, `{args.device}`\n\n{text}\n")
        if args.stream:
            text = format_stream(benchmark_stream(network, devices, args.stream, table, args.profile_batches,
                                                  args.budget, args.engine))
            print(f"\n{network}, {text}", flush=True)
            sections.append(f"### {network}, `{args.device}`, {text}\n")
    write_section(args.markdown, args.machine, f"{stamp}, commit {_commit()}: `{command}`\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
