"""Where hetero stands on this machine: each device with every engine installed, the best baseline a user
could run there, hetero's choice, and the split, all measured side by side in one process.

    python -m hetero.benchmark --network resnet-50 --device cpu,gpu0 --batch 100
    python -m hetero.benchmark --network bert-base --device cpu,gpu0 --sequence 128 --batch 64
    python -m hetero.benchmark --network bert-base --device gpu0 --sequence 128 --lengths mixed --stream 4096

Every run is timed the same way, host array in and host array out (copies included), in rounds that
alternate the runs so that drift hits all alike; each figure is a median. The baselines are the
engines a user already has, run as their own guides say (hetero.engines: PyTorch eager with
channels_last and cudnn.benchmark under inference_mode, torch.compile, ONNX Runtime with its default
graph optimisations and the same threads), on the same network with the same weights. TVM's engine
is reported on its own too, so that its gap stays visible. A text network (named inputs, an open sequence)
runs at `--sequence L`: random token ids, the attention mask all ones; with `--lengths mixed` the samples of
`--stream N` have lengths drawn from 1..L instead, and hetero's stream of them in sequence buckets is timed
against the same stream with every sample at L. Rates are img/s for an image network, samples/s for any other
(Network.rate_unit). The result replaces this machine's section of BENCHMARKS.md.
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

from .buckets import DEFAULT_BUCKETS, MASK, parse_buckets
from .command import Parser, batch_list, positive_int, run_command
from .devices import DEFAULT_PRECISION, PRECISIONS, Device, parse_devices, with_precision
from .engines import ENGINES, OWN_ENGINE, Engine, load_engine
from .errors import HeteroError
from .execute import run_split
from .inference import (
    DEFAULT_BUDGET_S,
    DEFAULT_TABLE,
    choose_engines,
    learn_company,
    plan,
    reserve_cores,
    share_limits,
)
from .models import Network, get_network
from .prepare import ensure_profiles
from .profile import SEED_BATCHES
from .selection import AUTO, candidate_engines, parse_engine_choice
from .session import Options, Session, stream
from .table import Profile, ProfileTable
from .timer import Timer, interleave

BASELINES = tuple(name for name in ENGINES if name != OWN_ENGINE)  # what users run without hetero


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
    unit: str = "img/s"  # what the rates count: Network.rate_unit

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


def text_network(network: Network, sequence: int | None) -> Network:
    """`network` as the benchmark runs it: a network of named inputs with an open sequence fitted to `sequence`,
    which it needs (a HeteroError says so in one line); any other network as it is, without one."""
    if not network.open_dimensions:
        if sequence is not None:
            raise HeteroError(f"--sequence {sequence}: {network.name} has no open sequence to fix")
        return network
    if sequence is None:
        raise HeteroError(f"{network.name} takes inputs by name with {', '.join(network.open_dimensions)} open: "
                          f"give --sequence L")
    return network.fit_sizes({dim: sequence for dim in network.open_dimensions})


def text_inputs(network: Network, batch: int, sequence: int, lengths: np.ndarray | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of named inputs at `sequence`: integer inputs drawn from 0 and 1 (token ids any vocabulary has),
    float inputs from a standard normal; the attention mask 1 up to each sample's length in `lengths` (all of
    `sequence` without), the other inputs shaped like it 0 beyond, as a tokenizer pads."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for tensor in network.inputs:
        shape = (batch, *(sequence if isinstance(dim, str) else dim for dim in tensor.shape))
        if np.issubdtype(np.dtype(tensor.dtype), np.integer):
            inputs[tensor.name] = rng.integers(0, 2, shape).astype(tensor.dtype)
        else:
            inputs[tensor.name] = rng.standard_normal(shape, dtype=np.float32).astype(tensor.dtype)
    reach = np.arange(sequence) < (np.full((batch, 1), sequence) if lengths is None else np.asarray(lengths)[:, None])
    for name, values in inputs.items():
        if name == MASK:
            inputs[name] = reach.astype(values.dtype)
        elif values.shape == reach.shape:
            values[~reach] = 0
    return inputs


def benchmark_inputs(net: Network, batch: int) -> np.ndarray:
    """`batch` samples for `net`: random ones, or for a network of named inputs (fitted to its sequence) the
    records of :func:`text_inputs`."""
    if not net.inputs:
        return net.random_input(batch)
    sequence = next((t.shape[0] for t in net.inputs if t.name == MASK), net.inputs[0].shape[0])
    return net.to_records(text_inputs(net, batch, sequence))


def benchmark(
    network: str | Network,
    devices: Sequence[Device],
    batch: int,
    table: ProfileTable,
    repeats: int = 5,
    warmup: int = 1,
    profile_batches: Sequence[int] = SEED_BATCHES,
    budget_s: float = DEFAULT_BUDGET_S,
    engine: str = AUTO,
) -> BenchmarkResult:
    """Each device alone on the whole batch with each engine, then hetero's split: all in one process. A network
    of named inputs is given fitted to its sequence (:func:`text_network`)."""
    net = get_network(network) if isinstance(network, str) else network
    devices = reserve_cores(devices)
    choice = parse_engine_choice(engine, devices)
    options = [[load_engine(net, device, name) for name in candidate_engines(net, device, choice[device.name])]
               for device in devices]
    profiles, _ = ensure_profiles([e for engines in options for e in engines], table, profile_batches,
                                  budget_s=budget_s)
    profiled = iter(profiles)
    pairs = [[(e, next(profiled)) for e in engines] for engines in options]
    engines, chosen = choose_engines(pairs, batch)
    inputs = benchmark_inputs(net, batch)
    limits = share_limits(chosen, devices)  # chunked as Inference.py runs them
    # One untimed split teaches the table each device's slowdown in company, as Inference.py's runs do,
    # so the timed split is the plan repeated runs of Inference.py settle on.
    shares, predicted, _ = plan(chosen, batch)
    if learn_company(table, chosen, run_split(engines, inputs, shares, predicted, limits)[1]):
        table.save()
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
    return BenchmarkResult(net.name, batch, results, batch / next(timed), partition_s * 1e6, net.rate_unit)


LOOP_BATCH = 256  # the batch of the plain loops a stream is compared with, as PyTorch's guides use
ALONE_S = 5.0  # a device streams alone for about this long at most


@dataclass
class StreamFigures:
    """One device streaming a host array, beside its best engine run plainly and on resident inputs."""

    device: Device
    engine: str
    samples: int
    stream_img_s: float  # hetero.stream, host array in, outputs returned
    file_img_s: float  # hetero.stream from a .npy in the page cache into a .npy
    loop_img_s: float  # the engine's plain loop over the same host array
    resident_img_s: float | None  # the engine on inputs already on the device
    unit: str = "img/s"

    def line(self, network: str) -> str:
        resident = (f"; resident {self.resident_img_s:.0f}; stream/resident {_ratio(self.stream_img_s, self.resident_img_s)}"
                    f"; file/resident {_ratio(self.file_img_s, self.resident_img_s)}" if self.resident_img_s else "")
        return (f"stream {self.device.name} {network} {self.device.precision}, {self.samples} samples: "
                f"{self.stream_img_s:.0f} {self.unit}; "
                f"from a .npy {self.file_img_s:.0f}; loop ({self.engine}) {self.loop_img_s:.0f}{resident}; "
                f"stream/loop {_ratio(self.stream_img_s, self.loop_img_s)}")


def host_array(net: Network, samples: int) -> np.ndarray:
    """`samples` inputs in host memory: random batches repeated (their values do not change the speed)."""
    block = benchmark_inputs(net, min(samples, LOOP_BATCH))
    return np.concatenate([block] * (-(-samples // len(block))))[:samples]


def benchmark_stream(net: Network, devices: Sequence[Device], samples: int, table: ProfileTable,
                     profile_batches: Sequence[int] = SEED_BATCHES, budget_s: float = DEFAULT_BUDGET_S,
                     engine: str = AUTO, repeats: int = 3,
                     precision: str = DEFAULT_PRECISION) -> tuple[list[StreamFigures], float | None]:
    """Per device: a stream from a host array and from a .npy file, against that device's engine in a plain
    loop over the same array and on resident inputs (medians of `repeats`), over `samples` samples or,
    for a device that would take longer, about ALONE_S of them; then, with several devices, the stream of
    all `samples` over all of them (its rate, else None)."""
    options = dict(table=table, profile_batches=profile_batches, budget_s=budget_s, progress=False, precision=precision)
    choice = parse_engine_choice(engine, devices)
    inputs = host_array(net, samples)

    def engines_of(on: Sequence[Device]) -> str:
        return ",".join(f"{device.name}={choice[device.name]}" for device in on)

    def streamed(on: Sequence[Device], source: np.ndarray | Path, target: Path | None = None) -> tuple[float, str]:
        reports = [stream(net, on, source, target, engine=engines_of(on), **options) for _ in range(repeats)]
        return statistics.median(r.throughput for r in reports), reports[-1].devices[0].engine

    figures = []
    with tempfile.TemporaryDirectory(prefix="hetero-stream-") as folder:
        for device in devices:
            first = stream(net, [device], inputs[: min(samples, 4 * LOOP_BATCH)], engine=engines_of([device]),
                           **options)  # warms, and sizes the run
            alone = inputs[: max(min(samples, int(first.throughput * ALONE_S)), LOOP_BATCH)]
            source = Path(folder) / "inputs.npy"
            np.save(source, alone)  # written now, so it is in the page cache
            stream_img_s, name = streamed([device], alone)
            file_img_s, _ = streamed([device], source, Path(folder) / "outputs.npy")
            chosen = load_engine(net, reserve_cores([device])[0], name)
            loop_s = Timer(lambda: chosen.on_worker(chosen.plain_loop, alone, LOOP_BATCH).result()).timeit(repeats).median
            resident = chosen.on_worker(chosen.resident_throughput, LOOP_BATCH).result()
            figures.append(StreamFigures(device, name, len(alone), stream_img_s, file_img_s, len(alone) / loop_s,
                                         resident, net.rate_unit))
    together = streamed(devices, inputs)[0] if len(devices) > 1 else None
    return figures, together


def format_stream(network: str, devices: Sequence[Device], samples: int, figures: list[StreamFigures],
                  together: float | None) -> str:
    lines = [f"- {f.line(network)}" for f in figures]
    if together is not None:
        best = max(figures, key=lambda f: f.stream_img_s)
        lines.append(f"- stream {','.join(d.name for d in devices)} {network}: {together:.0f} {best.unit}; best device "
                     f"alone ({best.device.name}) {best.stream_img_s:.0f}; together/best-alone "
                     f"{_ratio(together, best.stream_img_s)}")
    return (f"host array in, outputs returned (from a .npy: into a .npy); together: {samples} samples\n\n"
            + "\n".join(lines))


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
            d.chosen, _ratio(d.hetero_img_s, best and best[1]), _ratio(d.engine_img_s.get(OWN_ENGINE), best and best[1]),
            d.share, f"{d.predicted_s * 1e3:.1f}" if d.share else "-", f"{d.split_s * 1e3:.1f}" if d.share else "-",
        ])
    table = tabulate(
        rows,
        headers=["device", "hardware", "precision", *(f"{name} {result.unit}" for name in names),
                 f"best baseline {result.unit}",
                 "hetero runs", "hetero/best", f"{OWN_ENGINE}/best", "share", "predicted ms", "split ms"],
        tablefmt="github",
    )
    summary = (
        f"split {result.split_img_s:.1f} {result.unit}; ideal (sum of the devices with hetero's engines) "
        f"{result.ideal_img_s:.1f}; split/ideal {result.split_img_s / result.ideal_img_s:.2f}; "
        f"split/best-single {result.split_img_s / result.best_single_img_s:.2f} (best single: one device with "
        f"its fastest engine, {result.best_single_img_s:.1f}); partitioning {result.partition_us:.0f} us"
    )
    return f"{table}\n\n{summary}"


@dataclass
class MixedFigures:
    """A stream of samples of mixed lengths, in sequence buckets and with every sample at the longest."""

    samples: int
    sequence: int
    buckets: list[tuple[int, int]]  # (length, samples) of each bucket that ran
    bucketed_s: float  # median seconds of the whole stream in buckets
    full_s: float  # the same stream with every sample at `sequence`
    unit: str

    def text(self, network: str, devices: str) -> str:
        counts = ", ".join(f"{length}: {count}" for length, count in self.buckets)
        bucketed, full = self.samples / self.bucketed_s, self.samples / self.full_s
        return (f"- mixed lengths 1..{self.sequence} (uniform, seed 0), {self.samples} samples of {network} streamed "
                f"over `{devices}`: in buckets {bucketed:.1f} {self.unit} ({counts}); all at {self.sequence} "
                f"{full:.1f} {self.unit}; buckets/all-at-{self.sequence} {_ratio(bucketed, full)}")


def benchmark_mixed(network: Network, devices: Sequence[Device], samples: int, sequence: int, table: ProfileTable,
                    buckets: Sequence[int] = DEFAULT_BUCKETS, repeats: int = 3, warmup: int = 1,
                    profile_batches: Sequence[int] = SEED_BATCHES, budget_s: float = DEFAULT_BUDGET_S,
                    engine: str = AUTO, precision: str = DEFAULT_PRECISION) -> MixedFigures:
    """`samples` samples of `network` (named inputs, its sequence open) whose lengths are drawn uniformly from
    1..`sequence`, streamed by hetero in sequence `buckets`, against the same token ids with the mask all ones,
    which run every sample at `sequence` as --buckets none does (the mask's values do not change the work) on the
    same engines: one session, every length's engines prepared and profiled before the timing. Medians of rounds
    that alternate the two, the whole call timed (grouping, cutting and padding included)."""
    lengths = np.random.default_rng(0).integers(1, sequence + 1, samples)
    mixed = text_inputs(network, samples, sequence, lengths)
    full = {**mixed, MASK: np.ones_like(mixed[MASK])}
    options = Options(table=table, profile_batches=tuple(profile_batches), budget_s=budget_s, progress=False,
                      engine=engine, precision=precision, buckets=tuple(buckets))
    with Session(network, devices, options) as session:
        report = session.stream(mixed)  # prepares every bucket's engines, profiles them where the table has none
        session.stream(full)
        timed = interleave([Timer(lambda: session.stream(mixed)), Timer(lambda: session.stream(full))], repeats,
                           warmup)
    ran = [(b.length, b.samples) for b in report.buckets]
    return MixedFigures(samples, sequence, ran, timed[0].median, timed[1].median, network.rate_unit)


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
    parser.add_argument("--batch", type=batch_list, default=[], help="one or more batch sizes, comma-separated")
    parser.add_argument("--engine", default=AUTO, help="engines to measure (as Inference.py's --engine; default auto)")
    parser.add_argument("--stream", type=positive_int, metavar="SAMPLES",
                        help="stream this many samples: each device from a host array and from a .npy, beside its "
                             "engine's plain loop and on resident inputs; then all devices together")
    parser.add_argument("--sequence", type=positive_int, metavar="L",
                        help="a text network's sequence length (named inputs: random token ids, mask all ones)")
    parser.add_argument("--lengths", choices=("full", "mixed"), default="full",
                        help="mixed: the --stream samples' lengths drawn uniformly from 1..L (seeded), streamed in "
                             "sequence buckets against all at L; full (default): every sample at L")
    parser.add_argument("--buckets", type=parse_buckets, default=DEFAULT_BUCKETS, metavar="LENGTHS",
                        help=f"the sequence buckets of --lengths mixed (default {','.join(map(str, DEFAULT_BUCKETS))})")
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
    if not args.batch and not args.stream:
        parser.error("give --batch, --stream or both")
    if args.lengths == "mixed" and not (args.stream and args.sequence):
        parser.error("--lengths mixed streams --stream SAMPLES of lengths 1..L: give --stream and --sequence L")

    devices = with_precision(parse_devices(args.device), args.precision)
    table = ProfileTable.load(args.table, create=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m hetero.benchmark " + shlex.join(argv)
    sections = []
    for network in args.network.split(","):
        given = get_network(network)
        net = text_network(given, args.sequence)
        title = f"{network}, sequence {args.sequence}" if args.sequence else network
        for batch in args.batch:
            result = benchmark(net, devices, batch, table, args.repeats, args.warmup, args.profile_batches,
                               args.budget, args.engine)
            text = format_markdown(result)
            print(f"\n{title}, batch {batch}, devices {args.device}\n{text}", flush=True)
            sections.append(f"### {title}, batch {batch}, `{args.device}`\n\n{text}\n")
        if args.stream and args.lengths == "mixed":
            mixed = benchmark_mixed(given, devices, args.stream, args.sequence, table, args.buckets, args.repeats,
                                    args.warmup, args.profile_batches, args.budget, args.engine, args.precision)
            text = mixed.text(network, args.device)
            print(f"\n{title}, mixed lengths:\n{text}", flush=True)
            sections.append(f"### {title}, mixed lengths, `{args.device}`\n\n{text}\n")
        elif args.stream:
            figures, together = benchmark_stream(net, devices, args.stream, table, args.profile_batches,
                                                 args.budget, args.engine, args.repeats, args.precision)
            text = format_stream(network, devices, args.stream, figures, together)
            print(f"\n{title}, stream: {text}", flush=True)
            sections.append(f"### {title}, stream, `{args.device}`\n\n{text}\n")
    write_section(args.markdown, args.machine, f"{stamp}, commit {_commit()}: `{command}`\n\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, None))
