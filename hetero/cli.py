"""The three command lines (Inference.py, print_table.py, measure_io.py): parse, call the library, print.

Users see one `error: ...` line per failure (hetero.command): exit 2 for usage errors, 1 for failures while
running, 130 for Ctrl-C; `--debug` shows the traceback instead. What the library warns about while it works (a
device left out, a table entry not trusted) is printed as `note: ...` lines on stderr. The files are read,
checked and written by hetero.io.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from .buckets import DEFAULT_BUCKETS, parse_buckets, row_lengths
from .command import Parser, batch_list, nonnegative_seconds, positive_int, run_command
from .errors import UsageError
from .io import check_output, check_table, checked_path, read_inputs, read_named_inputs, write_outputs


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _share_note(share) -> str:
    notes = []
    if share.takes_over_from:
        notes.append(f"took over from {share.takes_over_from}")
    if share.calls > 1:
        notes.append(f"{share.calls} calls")
    if share.error:
        notes.append(f"failed after {share.completed} samples: {share.error}")
    return "; ".join(notes)


def format_report(report) -> str:
    """The run as a table per share (with its sequence length, where sequence buckets ran), then what went wrong
    and a summary, for people."""
    lengths = row_lengths(report.buckets)
    rows = []
    for index, share in enumerate(report.shares):
        timing = share.timing
        rows.append(
            ([lengths[index]] if lengths else [])
            + [
                share.device.name,
                share.engine,
                share.device.hardware,
                share.size,
                _ms(share.predicted_s) if share.size else "-",
                _ms(share.wall_s) if share.size else "-",
                _ms(timing.h2d_s + timing.d2h_s) if timing else "-",
                f"{share.compile_s:.1f}" if share.compile_s else "cached",
                _share_note(share),
            ]
        )
    table = tabulate(
        rows, headers=(["sequence"] if lengths else [])
        + ["device", "engine", "hardware", "samples", "predicted ms", "measured ms", "I/O ms", "compile s", "note"]
    )
    lines = [table]
    for fault in report.faults:
        if fault.stage == "run":
            helpers = sorted({s.device.name for s in report.shares if s.takes_over_from == fault.device})
            fate = f"its other {fault.moved} samples ran on {', '.join(helpers)}"
        else:
            fate = "left out"
        lines.append(f"fault: {fault.device} failed at {fault.stage}: {fault.error}; {fate}")
    summary = (
        f"{report.network}, batch {report.batch}: wall {_ms(report.wall_s)} ms, "
        f"{report.throughput:.1f} {report.unit}, predicted {_ms(report.predicted_s)} ms; "
        f"{report.partitioner} partitioning took {report.partition_s * 1e6:.0f} us"
    )
    if report.buckets:
        summary += "; sequence buckets: " + ", ".join(f"{b.length} ({b.samples} samples, {_ms(b.wall_s)} ms)"
                                                     for b in report.buckets)
    if report.profiled:
        summary += f"; profiled now: {', '.join(report.profiled)}"
    lines.append(summary)
    return "\n".join(lines)


def _list_cluster_devices(address: str) -> str:
    from .cluster import list_devices

    return list_devices(address)


def inference_main(argv: list[str]) -> int:
    from .devices import DEFAULT_PRECISION, PRECISIONS, describe
    from .engines import ENGINES
    from .images import ImageFolder
    from .inference import DEFAULT_BUDGET_S, DEFAULT_TABLE, DEFAULT_TUNE_BATCH
    from .models import get_network, network_names, registered_input_shape
    from .partition import PARTITIONERS
    from .profile import SEED_BATCHES
    from .session import infer
    from .stream import streams

    parser = Parser(prog="Inference.py", description="Split one inference batch across devices.")
    parser.add_argument("--network", help=f"one of {', '.join(network_names())}, or a path to an .onnx model")
    parser.add_argument("--device", help="comma-separated: cpu, igpu, gpu0, gpu1, ... (default cpu; with --ray, every "
                        "device of every node, or names such as node1/gpu0 for one node's)")
    parser.add_argument("--batch", type=positive_int, help="number of samples (random, deterministic)")
    # paths kept as typed, so that errors show them as the user wrote them ("out/", not "out")
    parser.add_argument("--input",
                        help=".npy file of inputs (N, C, H, W), or a folder of JPEG/PNG images, instead of random samples; "
                             "for a network of named inputs (a BERT-style encoder), an .npz of arrays by name")
    parser.add_argument("--output", help="write the outputs, in input order, to this .npy file (exactly this name)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help=f"profile table (default {DEFAULT_TABLE})")
    parser.add_argument("--partitioner", choices=sorted(PARTITIONERS), default="exact")
    parser.add_argument("--engine", default=None,
                        help="auto (profile every installed engine that can run the network on a device and run "
                             f"each device's fastest), one engine for all devices ({', '.join(ENGINES)}), or per "
                             "device, e.g. gpu0=torch,cpu=onnxruntime "
                             "(default: $HETERO_ENGINE, else auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic (default {DEFAULT_PRECISION}, as PyTorch's convolutions): "
                             "tf32 and fp16 run them on tensor cores (outputs within 2e-2 and 1e-2 relative "
                             "of fp32; tf32 only from sm_80 on, fp32 before), fp32 exactly on CUDA cores; "
                             "other devices always fp32")
    parser.add_argument("--profile-batches", type=batch_list, default=list(SEED_BATCHES),
                        help="batch sizes to profile, e.g. 1,2,4 (default: the seed's 20 sizes up to 129)")
    parser.add_argument("--reprofile", action="store_true", help="measure again even if the table has a profile")
    parser.add_argument("--budget", type=nonnegative_seconds, default=DEFAULT_BUDGET_S,
                        help=f"profiling seconds per device before the batch stops growing (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--tune", type=positive_int, metavar="TRIALS",
                        help="first run this many MetaSchedule trials for each CPU and CUDA device at --tune-batch")
    parser.add_argument("--tune-batch", type=positive_int, default=DEFAULT_TUNE_BATCH,
                        help=f"the batch tuned modules run (default {DEFAULT_TUNE_BATCH}); records of earlier "
                             "--tune runs at this batch are applied whenever they are faster")
    parser.add_argument("--stream", action="store_true",
                        help="stream --input into --output in chunks every device pulls, resumable, even when the input "
                             "is short (longer inputs always stream)")
    parser.add_argument("--buckets", type=parse_buckets, default=DEFAULT_BUCKETS, metavar="LENGTHS",
                        help="named inputs with an attention_mask run in sequence buckets of these lengths, each sample "
                             "cut after its mask's last 1 to the shortest that holds it: e.g. 32,64,128, or none "
                             f"(all at the input's length; default {','.join(map(str, DEFAULT_BUCKETS))})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--list-devices", action="store_true", help="print the devices found here and exit")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="stream --input into --output over every node of the Ray cluster at ADDRESS (HOST:PORT, "
                             "or auto: $RAY_ADDRESS, the cluster started on this machine, else a new one that "
                             "listens on 127.0.0.1 only); with --list-devices, list each node's devices")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    if args.list_devices:
        print(_list_cluster_devices(args.ray) if args.ray else describe())
        return 0
    if args.network is None:
        raise UsageError("--network is required")
    if (args.batch is None) == (args.input is None):
        raise UsageError("give exactly one of --batch N and --input FILE.npy")
    # Everything the run needs from the file system is checked now, before anything is compiled or profiled:
    # the input read, the table and the outputs writable where they will be written at the end.
    inputs = None
    if args.input is not None:
        input_path = checked_path("--input", args.input, lambda shown, path: None)
        if args.input.lower().endswith(".npz") and registered_input_shape(args.network) is None \
                and get_network(args.network).inputs:  # else refused as any file that is not a .npy one
            inputs = read_named_inputs(args.input, input_path)
        else:
            inputs = read_inputs(args.input, input_path, registered_input_shape(args.network),
                                 lambda: get_network(args.network).input_shape)
    output = None if args.output is None else checked_path("--output", args.output, check_output)
    table = checked_path("--table", args.table, check_table)
    if args.stream and (inputs is None or output is None):
        raise UsageError("--stream needs --input FILE.npy and --output FILE.npy")
    if args.ray and (inputs is None or output is None):
        raise UsageError("--ray streams --input FILE.npy into --output FILE.npy; give both")
    named = isinstance(inputs, dict)
    if isinstance(inputs, ImageFolder) and output is None:
        raise UsageError(f"--input {args.input}: a folder of images streams into --output FILE.npy; give one")
    samples = len(next(iter(inputs.values()))) if named else len(inputs) if inputs is not None else 0
    if inputs is not None and output is not None and (
            args.stream or args.ray or isinstance(inputs, ImageFolder) or streams(samples, output)):
        return _stream_main(args, inputs if named else input_path, output, table)
    report = infer(
        args.network,
        args.device or "cpu",
        batch=args.batch,
        inputs=inputs,
        table=table,
        partitioner=args.partitioner,
        profile_batches=args.profile_batches,
        reprofile=args.reprofile,
        budget_s=args.budget,
        progress=not args.no_progress and not args.json,
        precision=args.precision,
        engine=args.engine,
        tune_trials=args.tune or 0,
        tune_batch=args.tune_batch,
        buckets=args.buckets,
    )
    if output is not None:
        write_outputs(output, report.outputs, args.output)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def format_stream_report(report) -> str:
    """A stream as a table per device (per sequence bucket and device, where buckets ran), then a summary."""
    lengths = row_lengths(report.buckets)
    rows = [([lengths[index]] if lengths else []) + [d.device, d.engine, d.chunk, d.chunks, d.samples,
                                                      f"{d.throughput:.1f}", d.error or ""]
            for index, d in enumerate(report.devices)]
    table = tabulate(rows, headers=(["sequence"] if lengths else [])
                     + ["device", "engine", "chunk", "chunks", "samples", f"{report.unit} busy", "error"])
    resumed = f" ({report.resumed} done by an earlier run)" if report.resumed else ""
    return (f"{table}\n{report.network}, {report.samples} samples{resumed}: {report.computed} computed in "
            f"{report.wall_s:.2f} s, {report.throughput:.1f} {report.unit}")


def _stream_main(args: argparse.Namespace, inputs: Path | dict, output: Path, table: Path) -> int:
    from .session import stream

    devices = args.device or ("all" if args.ray else "cpu")
    report = stream(args.network, devices, inputs, output, table=table, profile_batches=args.profile_batches,
                    budget_s=args.budget, progress=not args.no_progress and not args.json, precision=args.precision,
                    engine=args.engine, ray=args.ray, buckets=args.buckets)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_stream_report(report))
    return 0


def print_table_main(argv: list[str]) -> int:
    from .table import ProfileTable, format_table

    parser = Parser(prog="print_table.py", description="Print a profile table.")
    parser.add_argument("table", type=Path, help="profile table (JSON)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw each profile's rate (img/s, samples/s) against batch size per device and engine "
                             "(needs matplotlib)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    table = ProfileTable.load(args.table)
    print(format_table(table))
    if args.plot is not None:
        from .plot import plot_table

        plot_table(table, args.plot)
    return 0


def measure_io_main(argv: list[str]) -> int:
    from .devices import parse_devices
    from .inference import check_host_memory
    from .models import get_network
    from .profile import measure_transfers

    parser = Parser(prog="measure_io.py", description="Time host-to-device and device-to-host copies per batch.")
    parser.add_argument("--network", required=True)
    parser.add_argument("--device", required=True, help="one device: cpu, igpu, gpu0, ...")
    parser.add_argument("--batch", type=positive_int, required=True, help="first batch size")
    parser.add_argument("--max_batch", type=positive_int, help="last batch size (default: --batch)")
    parser.add_argument("--inc", type=positive_int, default=1, help="batch size step (default 1)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    devices = parse_devices(args.device)
    if len(devices) != 1:
        raise UsageError("measure_io.py takes one device")
    last = args.max_batch or args.batch
    if last < args.batch:
        raise UsageError(f"--max_batch {last} is below --batch {args.batch}")
    network = get_network(args.network)
    check_host_memory(network, last)
    rows = measure_transfers(network, devices[0], range(args.batch, last + 1, args.inc))
    print(
        tabulate(
            [
                [r.batch, f"{r.input_bytes / 2**20:.2f}", _ms(r.h2d_s), f"{r.input_bytes / r.h2d_s / 1e9:.2f}",
                 f"{r.output_bytes / 2**10:.1f}", _ms(r.d2h_s)]
                for r in rows
            ],
            headers=["batch", "input MiB", "H2D ms", "H2D GB/s", "output KiB", "D2H ms"],
        )
    )
    return 0


def inference(argv: Sequence[str] | None = None) -> int:
    return run_command(inference_main, argv)


def print_table(argv: Sequence[str] | None = None) -> int:
    return run_command(print_table_main, argv)


def measure_io(argv: Sequence[str] | None = None) -> int:
    return run_command(measure_io_main, argv)
