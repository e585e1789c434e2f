"""The three command lines (Inference.py, print_table.py, measure_io.py): parse, call the library, print.

Users see one `error: ...` line per failure: exit 2 for usage errors, 1 for failures while running,
130 for Ctrl-C; `--debug` shows the traceback instead. What the library warns about while it works (a
device left out, a table entry not trusted) is printed as `note: ...` lines on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tabulate import tabulate

from .errors import HeteroError, one_line

USAGE_ERROR = 2
RUN_ERROR = 1


class UsageError(HeteroError):
    """Arguments that cannot be acted on."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def batch_list(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


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


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None) -> int:
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
    except KeyboardInterrupt as exc:
        _error(str(exc) or "interrupted; profiles measured so far are kept in the table")
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
        rows, headers=["device", "engine", "hardware", "samples", "predicted ms", "measured ms", "I/O ms", "compile s", "note"]
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


def _reason(exc: OSError) -> str:
    """An OSError as the few words after a path: "permission denied", "no space left on device"."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    return text[:1].lower() + text[1:]


def _shown(folder: Path) -> str:
    return "the current directory" if str(folder) == "." else str(folder)


def _save_outputs(path: Path, outputs: np.ndarray, shown: str | None = None) -> None:
    """Write the outputs atomically, so an interrupted run never leaves half a file, exactly at `path` (no
    .npy appended). On any failure nothing is left behind and the error names `shown` (the user's spelling
    of the path), never the temporary file."""
    shown = str(path) if shown is None else shown
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, outputs)
            handle.flush()
            os.fsync(handle.fileno())
        try:  # as a plain write would have it: the old file's mode, else 0666 less the umask (mkstemp's is 0600)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            what = "is a directory" if isinstance(exc, IsADirectoryError) else f"cannot write ({_reason(exc)})"
            raise HeteroError(f"--output {shown}: {what}") from None
        raise


def _nearest_existing_folder(flag: str, shown: str, folder: Path) -> tuple[Path, list[Path]]:
    """The deepest existing ancestor of `folder` (itself included) and the folders below it to create, top first;
    a UsageError where that ancestor is not a directory or cannot be looked at."""
    missing: list[Path] = []
    while True:
        try:
            info = os.stat(folder)
        except FileNotFoundError:
            if folder == folder.parent:
                raise UsageError(f"{flag} {shown}: {folder} does not exist") from None
            missing.insert(0, folder)
            folder = folder.parent
            continue
        except NotADirectoryError:  # some ancestor is a file: go up until it shows
            missing.clear()
            folder = folder.parent
            continue
        except OSError as exc:
            raise UsageError(f"{flag} {shown}: cannot reach {_shown(folder)} ({_reason(exc)})") from None
        if not stat.S_ISDIR(info.st_mode):
            kind = "a file, not a directory" if stat.S_ISREG(info.st_mode) else "not a directory"
            raise UsageError(f"{flag} {shown}: {folder} is {kind}")
        return folder, missing


def _check_writable_destination(flag: str, shown: str, path: Path) -> None:
    """Refuse, before any work, a file the run could not create or replace at the end: by really creating (and
    removing) a file, or the first missing folder, where the run will, so that permissions, read-only
    mounts and root's privileges count exactly as they will then. Nothing is left behind."""
    folder, missing = _nearest_existing_folder(flag, shown, path.parent)
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in [*(m.name for m in missing), path.name]:
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"{flag} {shown}: the name {part[:40]}... is too long (at most {name_max} bytes)")
    try:
        if missing:
            os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".hetero-check-"))
        else:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".hetero-check-", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        where = f"create directory {missing[0].name} in" if missing else "write in"
        raise UsageError(f"{flag} {shown}: cannot {where} {_shown(folder)} ({_reason(exc)})") from None
    if not missing:
        _check_replaceable(flag, shown, path, folder)


def _check_replaceable(flag: str, shown: str, path: Path, folder: Path) -> None:
    """In a sticky directory (/tmp) only the file's or the directory's owner may replace an existing file."""
    try:
        info, folder_info = os.lstat(path), os.stat(folder)
    except OSError:
        return
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if folder_info.st_mode & stat.S_ISVTX and euid not in (0, info.st_uid, folder_info.st_uid):
        raise UsageError(f"{flag} {shown}: cannot replace it, another user's file in the sticky directory "
                         f"{_shown(folder)}")


def _stat_or_none(path: Path) -> os.stat_result | None:
    """The file's status, or None where it does not exist or cannot be reached (the folder checks then say why)."""
    try:
        return os.stat(path)
    except OSError:
        return None


def _check_output(shown: str, path: Path) -> None:
    """--output: a file that does not exist or a regular file to replace, in a folder where the run can write."""
    info = _stat_or_none(path)
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UsageError(f"--output {shown}: is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise UsageError(f"--output {shown}: not a regular file (the outputs would replace it)")
    if shown.endswith(("/", os.sep)):
        raise UsageError(f"--output {shown}: names a directory; expected a file path such as {shown}outputs.npy")
    _check_writable_destination("--output", shown, path)


def _check_table(shown: str, path: Path) -> None:
    """--table: readable if it exists, and in a folder where profiles measured now can be saved (the table is
    replaced atomically beside itself, with a lock file "<table>.lock" there, so it is the folder that must take
    new files; the table file's own mode does not matter)."""
    info = _stat_or_none(path)
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"--table {shown}: cannot read profile table (is a directory)")
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"--table {shown}: cannot read profile table (not a regular file)")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"--table {shown}: cannot read profile table ({_reason(exc)})") from None
    elif shown.endswith(("/", os.sep)):
        raise UsageError(f"--table {shown}: names a directory; expected a file path such as {shown}profile_table.json")
    _check_writable_destination("--table", shown, path)
    lock = path.with_name(path.name + ".lock")
    if os.path.lexists(lock):
        try:
            os.close(os.open(lock, os.O_RDWR))
        except OSError as exc:
            raise UsageError(f"--table {shown}: cannot open its lock file {lock} ({_reason(exc)})") from None


def _checked_path(flag: str, text: str | os.PathLike[str], check: Callable[[str, Path], None]) -> Path:
    shown = os.fspath(text)
    if "\0" in shown:
        raise UsageError(f"{flag} {shown}: not a valid path (it contains a NUL character)")
    if not shown:
        raise UsageError(f"{flag}: the path is empty")
    path = Path(shown)
    check(shown, path)
    return path


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
SAVE_HINT = "a .npy array saved with numpy.save"


def _shape_text(sample: tuple[int, ...] | None) -> str:
    return f"(N, {', '.join(map(str, sample))})" if sample else "(N, ...)"


def _not_npy(path: Path, head: bytes, expected: str) -> str:
    """What a file that does not start as a .npy file is, and what was expected, for the error line."""
    if head.startswith(ZIP_MAGICS):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            return f"a damaged zip archive ({one_line(exc)}), expected {expected}"
        if names and all(name.endswith(".npy") for name in names):
            arrays = [name[: -len(".npy")] for name in names]
            listed = ", ".join(arrays[:5]) + (f", ... ({len(arrays)} in all)" if len(arrays) > 5 else "")
            return f"a .npz archive (arrays {listed}), expected one {expected}"
        return f"a zip archive, not a .npy file, expected {expected}"
    for magic, kind in ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                        (b"\x80", "a Python pickle"), (b"\x1f\x8b", "a gzip file")):
        if head.startswith(magic):
            return f"{kind}, not a .npy file, expected {expected}"
    if b"\0" not in head and all(b >= 32 or b in b"\t\n\r\f" for b in head):
        return f"not a .npy file (it starts with text), expected {SAVE_HINT}"
    return f"not a .npy file (it does not start with numpy's header), expected {SAVE_HINT}"


def _image_folder(path: Path, network: str, refuse: Callable[[str], UsageError]):  # noqa: ANN202 - an ImageFolder
    """A folder given as --input: its JPEG and PNG images, decoded as the stream reads them."""
    from .images import ImageFolder
    from .models import get_network

    try:
        return ImageFolder(path, get_network(network).input_shape)
    except HeteroError as exc:
        raise refuse(str(exc).removeprefix(f"{path}: ")) from None


def _load_inputs(shown: str, path: Path, network: str) -> np.ndarray:
    """The --input file memory-mapped (not read: a dataset larger than memory is copied share by share, chunk by
    chunk), after sniffing what it is so that anything else is refused in words: its magic bytes, then the .npy
    header's dtype and shape, before anything is mapped."""
    from .models import registered_input_shape

    sample = registered_input_shape(network)
    expected = f".npy array of shape {_shape_text(sample)}"

    def refuse(what: str) -> UsageError:
        return UsageError(f"--input {shown}: cannot read inputs: {what}")

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise refuse("no such file") from None
    except OSError as exc:
        raise refuse(_reason(exc)) from None
    if stat.S_ISDIR(info.st_mode):
        return _image_folder(path, network, refuse)
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"not a regular file, expected a {expected}")
    if info.st_size == 0:
        raise refuse(f"the file is empty, expected a {expected}")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if not head.startswith(NPY_MAGIC):
                raise refuse(_not_npy(path, head, expected))
            f.seek(0)
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, dtype = header[version](f) if version in header else (None, None, None)
            data_at = f.tell()
    except UsageError:
        raise
    except OSError as exc:
        raise refuse(_reason(exc)) from None
    except Exception as exc:  # numpy's header parser raises ValueError and others for a damaged header
        raise refuse(f"a damaged .npy file ({one_line(exc)})") from None
    if shape is not None:
        if dtype.hasobject:
            raise refuse(f"an array of Python objects (dtype {dtype}), expected numbers: a {expected}")
        if len(shape) == 0:
            raise refuse(f"a 0-d array (a single value), expected a {expected}")
        if sample and len(shape) != len(sample) + 1:
            raise refuse(f"a {len(shape)}-d array of shape {tuple(shape)}, expected a {len(sample) + 1}-d array "
                         f"of shape {_shape_text(sample)}")
        if shape[0] == 0:
            raise refuse(f"an array of shape {tuple(shape)}, with no samples")
        needed = data_at + math.prod(shape) * dtype.itemsize
        if info.st_size < needed:
            raise refuse(f"a truncated .npy file ({info.st_size} bytes, its header promises {needed})")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except Exception as exc:  # numpy raises many types for a file that is not an array
        raise refuse(f"a damaged .npy file ({one_line(exc)})") from None


def _list_cluster_devices(address: str) -> str:
    from .cluster import list_devices

    return list_devices(address)


def inference_main(argv: list[str]) -> int:
    from .devices import DEFAULT_PRECISION, PRECISIONS, describe
    from .images import ImageFolder
    from .inference import DEFAULT_BUDGET_S, DEFAULT_TABLE, DEFAULT_TUNE_BATCH
    from .models import network_names
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
                        help=".npy file of inputs (N, C, H, W), or a folder of JPEG/PNG images, instead of random samples")
    parser.add_argument("--output", help="write the outputs, in input order, to this .npy file (exactly this name)")
    parser.add_argument("--table", default=str(DEFAULT_TABLE), help=f"profile table (default {DEFAULT_TABLE})")
    parser.add_argument("--partitioner", choices=sorted(PARTITIONERS), default="exact")
    parser.add_argument("--engine", default=None,
                        help="auto (profile every installed engine that can run the network on a device and run "
                             "each device's fastest), one engine for all devices (tvm, onnxruntime, openvino, "
                             "torch, torch-compile), or per device, e.g. gpu0=torch,cpu=onnxruntime "
                             "(default: $HETERO_ENGINE, else auto)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help=f"the CUDA GPUs' arithmetic (default {DEFAULT_PRECISION}, as PyTorch's convolutions): "
                             "tf32 and fp16 run them on tensor cores (outputs within 2e-2 and 1e-2 relative "
                             "of fp32; tf32 only from sm_80 on, fp32 before), fp32 exactly on CUDA cores; "
                             "other devices always fp32")
    parser.add_argument("--profile-batches", type=batch_list, default=list(SEED_BATCHES),
                        help="batch sizes to profile, e.g. 1,2,4 (default: the seed's 20 sizes up to 129)")
    parser.add_argument("--reprofile", action="store_true", help="measure again even if the table has a profile")
    parser.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET_S,
                        help=f"profiling seconds per device before the batch stops growing (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--tune", type=positive_int, metavar="TRIALS",
                        help="first run this many MetaSchedule trials for each CPU and CUDA device at --tune-batch")
    parser.add_argument("--tune-batch", type=positive_int, default=DEFAULT_TUNE_BATCH,
                        help=f"the batch tuned modules run (default {DEFAULT_TUNE_BATCH}); records of earlier "
                             "--tune runs at this batch are applied whenever they are faster")
    parser.add_argument("--stream", action="store_true",
                        help="stream --input into --output in chunks every device pulls, resumable, even when the input "
                             "is short (longer inputs always stream)")
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
        input_path = _checked_path("--input", args.input, lambda shown, path: None)
        inputs = _load_inputs(args.input, input_path, args.network)
    output = None if args.output is None else _checked_path("--output", args.output, _check_output)
    table = _checked_path("--table", args.table, _check_table)
    if args.stream and (inputs is None or output is None):
        raise UsageError("--stream needs --input FILE.npy and --output FILE.npy")
    if args.ray and (inputs is None or output is None):
        raise UsageError("--ray streams --input FILE.npy into --output FILE.npy; give both")
    if isinstance(inputs, ImageFolder) and output is None:
        raise UsageError(f"--input {args.input}: a folder of images streams into --output FILE.npy; give one")
    if inputs is not None and output is not None and (
            args.stream or args.ray or isinstance(inputs, ImageFolder) or streams(len(inputs), output)):
        return _stream_main(args, input_path, output, table)
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
    )
    if output is not None:
        _save_outputs(output, report.outputs, args.output)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def format_stream_report(report) -> str:
    """A stream as a table per device, then a summary."""
    rows = [[d.device, d.engine, d.chunk, d.chunks, d.samples, f"{d.throughput:.1f}", d.error or ""]
            for d in report.devices]
    table = tabulate(rows, headers=["device", "engine", "chunk", "chunks", "samples", "img/s busy", "error"])
    resumed = f" ({report.resumed} done by an earlier run)" if report.resumed else ""
    return (f"{table}\n{report.network}, {report.samples} samples{resumed}: {report.computed} computed in "
            f"{report.wall_s:.2f} s, {report.throughput:.1f} img/s")


def _stream_main(args: argparse.Namespace, input_path: Path, output: Path, table: Path) -> int:
    from .session import stream

    devices = args.device or ("all" if args.ray else "cpu")
    report = stream(args.network, devices, input_path, output, table=table, profile_batches=args.profile_batches,
                    budget_s=args.budget, progress=not args.no_progress and not args.json, precision=args.precision,
                    engine=args.engine, ray=args.ray)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_stream_report(report))
    return 0


def print_table_main(argv: list[str]) -> int:
    from .table import ProfileTable, format_table

    parser = Parser(prog="print_table.py", description="Print a profile table.")
    parser.add_argument("table", type=Path, help="profile table (JSON)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw img/s against batch size per device and engine (needs matplotlib)")
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
