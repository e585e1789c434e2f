"""The command lines under hypothesis: bad arguments and bad files give one `error:` line, never a traceback.

Every generated command line ends in one argument that is sure to fail validation (a "poison"), so that
no example compiles or runs a network and the whole file stays fast; what comes before it is anything
at all, often a valid command. A tripwire turns any example that gets as far as the devices into a
failure at once, rather than a run of minutes.
"""

import contextlib
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hetero.prepare
import hetero.profile
from hetero import cli
from hetero.table import FORMAT, ProfileTable, TableError, format_table

from .conftest import SMALL_NETWORK

# Flags that succeed without doing anything checkable (help, the device list) or re-raise (debug).
NOT_FUZZED = ("--help", "--list-devices", "--debug")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class ReachedTheDevices(BaseException):
    """A command line got past validation (BaseException: no error handler may turn it into an error line)."""


@pytest.fixture(autouse=True)
def tripwire(monkeypatch):
    def reached(*args, **kwargs):
        raise ReachedTheDevices(args)

    monkeypatch.setattr(hetero.prepare, "load_engines", reached)  # every Inference.py run passes here
    monkeypatch.setattr(hetero.profile, "measure_transfers", reached)  # and every measure_io.py run here


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Files a command line may name: none of them lets a run start."""
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "corrupt.json").write_text("{not json")
    (root / "foreign.json").write_text('{"name": "someone else\'s settings"}')
    (root / "a-directory").mkdir()
    np.save(root / "wrong-shape.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(root / "text.npy", np.full((1, 3, 224, 224), "x"))
    np.save(root / "one-sample.npy", np.zeros((1, 3, 224, 224), np.float32))  # valid: only before a poison
    (root / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    (root / "empty.npy").write_bytes(b"")
    return root


def _call(command, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = command(argv)
    return rc, out.getvalue(), err.getvalue()


def _assert_one_error_line(rc: int, out: str, err: str) -> None:
    assert rc != 0, (out, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err


def _fuzzed_flag(token: str) -> bool:
    if token.startswith("-h"):
        return False
    return not (token.startswith("--") and len(token) > 2 and any(flag.startswith(token) for flag in NOT_FUZZED))


def _arguments(flags: list[str], values: list[str], files: list[str], valid: list[list[str]]):
    """Junk, then often a valid command, then more junk: the command's flags, near-miss flags, values, files."""
    token = st.one_of(
        st.sampled_from(flags + values + files),
        st.from_regex(r"\A--?[a-z_=-]{0,12}\Z"),
        st.integers(-3, 10**15).map(str),
        st.text(max_size=10),
    ).filter(_fuzzed_flag)
    junk = st.lists(token, max_size=6)
    return (st.tuples(junk, st.sampled_from([[], *valid]), junk)
            .map(lambda parts: [a for part in parts for a in part])
            .filter(lambda argv: not (argv and _takes_next_as_value(argv[-1], flags))))


VALUELESS = {"--reprofile", "--json", "--no-progress", "--list-devices", "--debug", "--help"}


def _takes_next_as_value(token: str, flags: list[str]) -> bool:
    """Whether `token` (a flag or an abbreviation of one, without `=value`) would swallow the poison after it
    as its value, which would make the poison no poison at all."""
    return (token.startswith("--") and len(token) > 2 and "=" not in token
            and any(flag.startswith(token) and flag not in VALUELESS for flag in flags))


INFERENCE_FLAGS = ["--network", "--device", "--batch", "--input", "--output", "--table", "--partitioner",
                   "--profile-batches", "--reprofile", "--budget", "--json", "--no-progress"]
DEVICE_VALUES = ["cpu", "gpu0", "gpu", "igpu", "cpu,cpu", "cpu,", ",", "CPU", "gpu-1", "cpu,gpu0"]
NUMBER_VALUES = ["0", "-1", "1", "3", "1e3", "nan", "inf", "-0.5", "2,3", "1,,2", "", " 4"]
RANDOM_BATCH = ["--network", SMALL_NETWORK, "--device", "cpu", "--batch", "2", "--profile-batches", "1"]


def _input_batch(files) -> list[str]:
    return ["--network", SMALL_NETWORK, "--input", str(files / "one-sample.npy")]


def _inference_poisons(files) -> list[tuple[list[str], list[str], str]]:
    """(a valid command, an argument that, added last, makes it fail before any device work, the error)."""
    return [(RANDOM_BATCH, poison, error) for poison, error in (
        (["--batch", "0"], "must be at least 1"),
        (["--device", "gpu7"], "device 'gpu7' not found"),
        (["--device", "cpu,cpu"], "listed twice"),
        (["--network", "resnet-51"], "unknown network 'resnet-51'"),
        (["--partitioner", "fastest"], "invalid choice: 'fastest'"),
        (["--profile-batches", "4,,2"], "expected a whole number"),
        (["--budget", "nan"], "finite number of seconds"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["stray-positional"], "unrecognized arguments: stray-positional"),
        (["--batch", str(10**13)], f"batch {10**13} needs"),
        (["--profile-batches", f"1,{10**13}"], f"profiling batch {10**13} needs"),
        (["--table", str(files / "corrupt.json")], "corrupt profile table"),
        (["--table", str(files / "foreign.json")], "not a hetero profile table"),
        (["--table", str(files / "a-directory")], "cannot read profile table"),
        (["--batch", "2", "--input", str(files / "one-sample.npy")], "exactly one of --batch N and --input"),
    )] + [(_input_batch(files), ["--input", str(files / name)], error) for name, error in (
        ("wrong-shape.npy", "do not fit squeezenet"),
        ("text.npy", "dtype <U1 are not real numbers"),
        ("garbage.npy", "cannot read inputs"),
        ("empty.npy", "cannot read inputs"),
        ("a-directory", "cannot read inputs"),
        ("missing.npy", "cannot read inputs"),
    )]


def test_the_valid_commands_reach_the_tripwire(files, monkeypatch):
    monkeypatch.chdir(files)
    for valid in (RANDOM_BATCH, _input_batch(files)):
        with pytest.raises(ReachedTheDevices):
            cli.inference(valid)
    with pytest.raises(ReachedTheDevices):
        cli.measure_io(MEASURE_IO)


def test_each_poison_alone_fails_a_valid_command_with_its_own_error(files, monkeypatch):
    monkeypatch.chdir(files)
    for valid, poison, error in _inference_poisons(files):
        rc, out, err = _call(cli.inference, valid + poison)
        _assert_one_error_line(rc, out, err)
        assert error in err, (poison, err)
    for poison, error in MEASURE_IO_POISONS:
        rc, out, err = _call(cli.measure_io, MEASURE_IO + poison)
        _assert_one_error_line(rc, out, err)
        assert error in err, (poison, err)


def test_an_unforeseen_exception_is_one_line_too():
    def main(argv):
        raise RuntimeError("something nobody planned for\nwith details")

    rc, out, err = _call(lambda argv: cli.run_command(main, argv), [])
    _assert_one_error_line(rc, out, err)
    assert err == "error: unexpected RuntimeError: something nobody planned for (--debug shows where)\n"
    with pytest.raises(RuntimeError):
        cli.run_command(main, ["--debug"])


def test_inference_arguments(files, monkeypatch):
    monkeypatch.chdir(files)  # the default table path resolves here, where no run can write
    names = [str(files / name) for name in ("one-sample.npy", "corrupt.json", "missing.npy", "a-directory")]
    values = [SMALL_NETWORK, "resnet-51", "x.onnx", "exact", "greedy", *DEVICE_VALUES, *NUMBER_VALUES]
    poisons = [poison for _, poison, _ in _inference_poisons(files)]

    @FUZZ
    @given(_arguments(INFERENCE_FLAGS, values, names, [RANDOM_BATCH, _input_batch(files)]), st.sampled_from(poisons))
    @example([*RANDOM_BATCH, "--table", "bad\x00name"], ["--device", "gpu7"])
    @example(["--network", SMALL_NETWORK, "--budget=-1"], ["--batch", "2"])
    @example(["\r0"], ["--device", "gpu7"])
    def check(argv, poison):
        _assert_one_error_line(*_call(cli.inference, argv + poison))

    check()


MEASURE_IO = ["--network", SMALL_NETWORK, "--device", "cpu", "--batch", "1", "--max_batch", "3"]
MEASURE_IO_POISONS = [
    (["--batch", "0"], "must be at least 1"),
    (["--inc", "-2"], "must be at least 1"),
    (["--device", "gpu7"], "device 'gpu7' not found"),
    (["--device", "cpu,cpu"], "listed twice"),
    (["--device", "cpu,gpu0"], "device 'gpu0' not found"),
    (["--network", "resnet-51"], "unknown network 'resnet-51'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["stray-positional"], "unrecognized arguments: stray-positional"),
    (["--max_batch", str(10**13)], f"batch {10**13} needs"),
]


def test_measure_io_arguments(files):
    flags = ["--network", "--device", "--batch", "--max_batch", "--inc"]
    values = [SMALL_NETWORK, "resnet-51", *DEVICE_VALUES, *NUMBER_VALUES]

    @FUZZ
    @given(_arguments(flags, values, [], [MEASURE_IO]), st.sampled_from([poison for poison, _ in MEASURE_IO_POISONS]))
    def check(argv, poison):
        _assert_one_error_line(*_call(cli.measure_io, argv + poison))

    check()


def test_print_table_arguments(files):
    names = [str(files / name) for name in ("corrupt.json", "foreign.json", "a-directory", "missing.json")]
    poisons = [[name] for name in names] + [["--frobnicate"]]

    @FUZZ
    @given(_arguments([], [], names, []), st.sampled_from(poisons))
    def check(argv, poison):
        _assert_one_error_line(*_call(cli.print_table, argv + poison))

    check()


# Table files: valid ones with any field swapped for arbitrary JSON, and arbitrary bytes.
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


def _or_junk(valid):
    return st.one_of(valid, valid, valid, _json)


# Near-valid values: the right types with the edge cases a hand-edited or damaged table could hold.
_seconds = st.lists(st.floats(1e-5, 1.0) | st.floats() | st.sampled_from([0, 0.0, -1e-3]), max_size=3)
_measurement = st.fixed_dictionaries({
    "batch": _or_junk(st.integers(-1, 64) | st.booleans()),
    "exec_s": _or_junk(_seconds),
    "h2d_s": _or_junk(_seconds),
    "d2h_s": _or_junk(_seconds),
    "error": _or_junk(st.none() | st.text(max_size=12)),
})
_profile = st.fixed_dictionaries({
    "stopped": _or_junk(st.none() | st.text(max_size=12)),
    "interrupted": _or_junk(st.booleans()),
    "measurements": _or_junk(st.lists(_measurement, max_size=4)),
})
_document = st.fixed_dictionaries({
    "format": _or_junk(st.just(FORMAT)),
    "version": _or_junk(st.just(1)),
    "profiles": _or_junk(st.dictionaries(st.text(max_size=8), _or_junk(st.dictionaries(st.text(max_size=8), _profile,
                                                                                         max_size=2)), max_size=2)),
})


def _check_table_file(path, content: bytes) -> None:
    """A table file either loads into profiles the partitioner can use, or is refused in one line, untouched."""
    path.write_bytes(content)
    try:
        table = ProfileTable.load(path)
    except TableError as exc:
        assert "\n" not in str(exc)
        _assert_one_error_line(*_call(cli.print_table, [str(path)]))
        assert path.read_bytes() == content
        return
    for profile in table.profiles():
        curve = profile.cost_curve(20)
        assert curve[0] == 0 and not np.isnan(curve).any() and np.all(np.diff(curve) >= 0) and np.all(curve >= 0)
        assert all(math.isfinite(c) for c in curve) or profile.max_batch() == 0
    assert format_table(table)
    rc, out, err = _call(cli.print_table, [str(path)])
    assert (rc, err) == (0, "") and out


@pytest.mark.filterwarnings("error")  # a division by zero in a derived time is a failure too
def test_table_files_with_any_content(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-tables") / "table.json"

    @FUZZ
    @given(_document)
    @example({"format": FORMAT, "version": 1, "profiles": {"k": {"n": {"stopped": None, "measurements": [
        {"batch": 1, "exec_s": [], "h2d_s": [0.1], "d2h_s": [0.1], "error": None}]}}}})
    @example({"format": FORMAT, "version": 1, "profiles": {"k": {"n": {"stopped": None, "measurements": [
        {"batch": 1, "exec_s": [math.nan], "h2d_s": [0.1], "d2h_s": [0.1], "error": None}]}}}})
    @example({"format": FORMAT, "version": 1, "profiles": {"k": {"n": {"stopped": None, "measurements": [
        {"batch": 1, "exec_s": [math.inf], "h2d_s": [0.1], "d2h_s": [0.1], "error": None}]}}}})
    @example({"format": FORMAT, "version": 1, "profiles": {"k": {"n": {"stopped": None, "measurements": [
        {"batch": 2, "exec_s": [0.0, 0.0], "h2d_s": [0.1], "d2h_s": [0.1], "error": None}]}}}})
    @example({"format": FORMAT, "version": 1, "profiles": {"k\nk": {"n": {"stopped": None, "measurements": []}}}})
    def check_document(doc):
        _check_table_file(path, json.dumps(doc).encode())

    @FUZZ
    @given(st.binary(max_size=64))
    def check_bytes(content):
        _check_table_file(path, content)

    check_document()
    check_bytes()
