"""The three command lines (Inference.py, print_table.py, measure_io.py): parse, call the library, print.

Users see one `error: ...` line per failure: exit 2 for usage errors, 1 for failures while running,
130 for Ctrl-C; `--debug` shows the traceback instead. What the library warns about while it works (a
device left out, a table entry not trusted) is printed as `note: ...` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .errors import HeteroError, one_line

USAGE_ERROR = 2
RUN_ERROR = 1


class UsageError(HeteroError):
    """Arguments that cannot be acted on."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",")]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, at least 0, got {text!r}")
    return value


class _NoteHandler(logging.Handler):
    """The library's warnings as `note: ...` lines, written to whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def _show_notes() -> None:
    logger = logging.getLogger("hetero")
    if not any(isinstance(handler, _NoteHandler) for handler in logger.handlers):
        logger.addHandler(_NoteHandler())


def _error(message: str) -> None:
    """Print `error: message` as one line, whatever control characters the user's text brought in."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    print(f"error: {text}", file=sys.stderr)


def _run(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    _show_notes()
    try:
        return main(args)
    except UsageError as exc:
        if "--debug" in args:
            raise
        _error(str(exc))
        return USAGE_ERROR
    except (HeteroError, OSError, ValueError) as exc:
        if "--debug" in args:
            raise
        _error(one_line(exc))
        return RUN_ERROR
    except KeyboardInterrupt:
        _error("interrupted; profiles measured so far are kept in the table")
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line, the traceback on request
        if "--debug" in args:
            raise
        _error(f"unexpected {type(exc).__name__}: {one_line(exc)} (--debug shows where)")
        return RUN_ERROR


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
    """The run as a table per share, then what went wrong and a summary, for people."""
    rows = []
    for share in report.shares:
        timing = share.timing
        rows.append(
            [
                share.device.name,
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
        rows, headers=["device", "hardware", "samples", "predicted ms", "measured ms", "I/O ms", "compile s", "note"]
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
        f"{report.throughput:.1f} img/s, predicted {_ms(report.predicted_s)} ms; "
        f"{report.partitioner} partitioning took {report.partition_s * 1e6:.0f} us"
    )
    if report.profiled:
        summary += f"; profiled now: {', '.join(report.profiled)}"
    lines.append(summary)
    return "\n".join(lines)


def _save_outputs(path: Path, outputs: np.ndarray) -> None:
    """Write the outputs atomically, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as handle:
        np.save(handle, outputs)
    os.replace(handle.name, path)


def _list_devices() -> str:
    from .devices import OpenCLBackend, available_devices

    return "\n".join([device.describe() for device in available_devices()] + OpenCLBackend.notes())


def inference_main(argv: list[str]) -> int:
    from .inference import DEFAULT_BUDGET_S, DEFAULT_TABLE, DEFAULT_TUNE_BATCH, infer
    from .models import network_names
    from .devices import DEFAULT_PRECISION, PRECISIONS
    from .partition import PARTITIONERS
    from .profile import SEED_BATCHES

    parser = _Parser(prog="Inference.py", description="Split one inference batch across devices.")
    parser.add_argument("--network", help=f"one of {', '.join(network_names())}, or a path to an .onnx model")
    parser.add_argument("--device", default="cpu", help="comma-separated: cpu, igpu, gpu0, gpu1, ... (default cpu)")
    parser.add_argument("--batch", type=_positive_int, help="number of samples (random, deterministic)")
    parser.add_argument("--input", type=Path, help=".npy file of inputs (N, C, H, W) instead of random samples")
    parser.add_argument("--output", type=Path, help="write the outputs, in input order, to this .npy file")
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE, help=f"profile table (default {DEFAULT_TABLE})")
    parser.add_argument("--partitioner", choices=sorted(PARTITIONERS), default="exact")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic (default {DEFAULT_PRECISION}, as PyTorch's convolutions): "
                             "tf32 and fp16 run them on tensor cores (outputs within 2e-2 and 1e-2 relative "
                             "of fp32; tf32 only from sm_80 on, fp32 before), fp32 exactly on CUDA cores; "
                             "other devices always fp32")
    parser.add_argument("--profile-batches", type=_batch_list, default=list(SEED_BATCHES),
                        help="batch sizes to profile, e.g. 1,2,4 (default: the seed's 20 sizes up to 129)")
    parser.add_argument("--reprofile", action="store_true", help="measure again even if the table has a profile")
    parser.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET_S,
                        help=f"profiling seconds per device before the batch stops growing (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--tune", type=_positive_int, metavar="TRIALS",
                        help="first run this many MetaSchedule trials for each CPU and CUDA device at --tune-batch")
    parser.add_argument("--tune-batch", type=_positive_int, default=DEFAULT_TUNE_BATCH,
                        help=f"the batch tuned modules run (default {DEFAULT_TUNE_BATCH}); records of earlier "
                             "--tune runs at this batch are applied whenever they are faster")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--list-devices", action="store_true", help="print the devices found here and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    if args.list_devices:
        print(_list_devices())
        return 0
    if args.network is None:
        raise UsageError("--network is required")
    if (args.batch is None) == (args.input is None):
        raise UsageError("give exactly one of --batch N and --input FILE.npy")
    inputs = None
    if args.input is not None:
        try:
            # mapped, not read: a dataset larger than memory is copied share by share, chunk by chunk
            inputs = np.load(args.input, allow_pickle=False, mmap_mode="r")
        except Exception as exc:  # numpy raises many types for a file that is not an array
            raise UsageError(f"cannot read inputs from {args.input}: {one_line(exc)}") from None
    report = infer(
        args.network,
        args.device,
        batch=args.batch,
        inputs=inputs,
        table=args.table,
        partitioner=args.partitioner,
        profile_batches=args.profile_batches,
        reprofile=args.reprofile,
        budget_s=args.budget,
        progress=not args.no_progress and not args.json,
        precision=args.precision,
        tune_trials=args.tune or 0,
        tune_batch=args.tune_batch,
    )
    if args.output is not None:
        _save_outputs(args.output, report.outputs)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def print_table_main(argv: list[str]) -> int:
    from .table import ProfileTable, format_table

    parser = _Parser(prog="print_table.py", description="Print a profile table.")
    parser.add_argument("table", type=Path, help="profile table (JSON)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    print(format_table(ProfileTable.load(args.table)))
    return 0


def measure_io_main(argv: list[str]) -> int:
    from .devices import parse_devices
    from .inference import check_host_memory
    from .models import get_network
    from .profile import measure_transfers

    parser = _Parser(prog="measure_io.py", description="Time host-to-device and device-to-host copies per batch.")
    parser.add_argument("--network", required=True)
    parser.add_argument("--device", required=True, help="one device: cpu, igpu, gpu0, ...")
    parser.add_argument("--batch", type=_positive_int, required=True, help="first batch size")
    parser.add_argument("--max_batch", type=_positive_int, help="last batch size (default: --batch)")
    parser.add_argument("--inc", type=_positive_int, default=1, help="batch size step (default 1)")
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
    return _run(inference_main, argv)


def print_table(argv: Sequence[str] | None = None) -> int:
    return _run(print_table_main, argv)


def measure_io(argv: Sequence[str] | None = None) -> int:
    return _run(measure_io_main, argv)
