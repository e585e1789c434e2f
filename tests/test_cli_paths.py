"""Inference.py's --output, --table and --input paths: a path that cannot work is refused before any
compiling, profiling or running, in one `error:` line that names the user's path, leaving no file behind."""

import errno
import os
import tempfile

import numpy as np
import pytest

import hetero.session
from hetero import cli, io
from hetero.errors import HeteroError

from .conftest import SMALL_NETWORK

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = "root ignores directory write bits, so a chmod 0o555 directory is writable; the simulated case covers it"


class ReachedInfer(BaseException):
    """infer() was called (BaseException: no error handler may turn it into an error line)."""


@pytest.fixture(autouse=True)
def tripwire(monkeypatch, tmp_path):
    def reached(*args, **kwargs):
        raise ReachedInfer(args)

    monkeypatch.setattr(hetero.session, "infer", reached)
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them, resolve in the test's own folder


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused(capsys, argv, path_text):
    """Run Inference.py with argv: it must fail in one error line naming path_text, without reaching infer()."""
    rc = cli.inference(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert path_text in lines[0], lines[0]
    return lines[0]


def _run_args(*extra):
    return ["--network", SMALL_NETWORK, "--batch", "4", "--no-progress", "--table", "t.json", *extra]


# ------------------------------------------------------------------ --output


def test_output_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    before = _listing(tmp_path)
    line = _refused(capsys, _run_args("--output", "out/"), "--output out/")
    assert line == "error: --output out/: is a directory"
    assert _listing(tmp_path) == before  # no table, no temporary file


def test_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    before = _listing(tmp_path)
    line = _refused(capsys, _run_args("--output", "a.txt/o.npy"), "--output a.txt/o.npy")
    assert line == "error: --output a.txt/o.npy: a.txt is a file, not a directory"
    line = _refused(capsys, _run_args("--output", "a.txt/deeper/o.npy"), "--output a.txt/deeper/o.npy")
    assert line.endswith(": a.txt is a file, not a directory")
    assert _listing(tmp_path) == before


def test_output_naming_a_missing_directory(tmp_path, capsys):
    before = _listing(tmp_path)
    line = _refused(capsys, _run_args("--output", "newdir/"), "--output newdir/")
    assert "names a directory" in line
    assert _listing(tmp_path) == before


@pytest.mark.skipif(AS_ROOT, reason=ROOT_SKIP)
def test_output_in_a_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "sub").mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(capsys, _run_args("--output", "ro/o.npy"), "--output ro/o.npy")
        assert line == "error: --output ro/o.npy: cannot write in ro (permission denied)"
        line = _refused(capsys, _run_args("--output", "ro/new/o.npy"), "--output ro/new/o.npy")
        assert line == "error: --output ro/new/o.npy: cannot create directory new in ro (permission denied)"
        assert _listing(ro) == ["sub"]
    finally:
        ro.chmod(0o755)


def _deny_writes_in(monkeypatch, folder):
    """Make creating files and directories in `folder` fail as in a directory without write permission."""
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp

    def denied(real):
        def call(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmpXYZ"))
            return real(*args, dir=dir, **kwargs)

        return call

    monkeypatch.setattr(tempfile, "mkstemp", denied(real_mkstemp))
    monkeypatch.setattr(tempfile, "mkdtemp", denied(real_mkdtemp))


def test_output_in_a_directory_that_refuses_writes_simulated(tmp_path, capsys, monkeypatch):
    """The read-only case where the tests run as root (which writes anywhere), by failing the probe as the
    kernel would for another user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    _deny_writes_in(monkeypatch, ro)
    line = _refused(capsys, _run_args("--output", "ro/o.npy"), "--output ro/o.npy")
    assert line == "error: --output ro/o.npy: cannot write in ro (permission denied)"
    assert "tmpXYZ" not in line
    assert _listing(ro) == []


def test_a_writable_output_path_reaches_infer_and_leaves_nothing(tmp_path):
    """The check creates nothing: not the missing parent, not a probe file (the run creates them later)."""
    (tmp_path / "some").mkdir()
    before = _listing(tmp_path)
    with pytest.raises(ReachedInfer):
        cli.inference(_run_args("--output", "some/new/deeper/o.npy"))
    with pytest.raises(ReachedInfer):
        cli.inference(_run_args("--output", "some/o.npy"))
    assert _listing(tmp_path) == before


# ------------------------------------------------------------------ saving the outputs


def test_save_outputs_over_a_directory_leaves_nothing_and_names_the_path(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(HeteroError) as caught:
        io.write_outputs(tmp_path / "out", np.zeros((4, 1000), np.float32))
    message = str(caught.value)
    assert str(tmp_path / "out") in message and "is a directory" in message
    assert ".tmp" not in message and "tmp" not in message.replace(str(tmp_path), "")
    assert _listing(tmp_path) == ["out"]


def test_save_outputs_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "o.npy"
    target.write_bytes(b"the previous outputs")

    def full_disk(handle, array, *args, **kwargs):
        handle.write(b"\x93NUMPY" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(HeteroError) as caught:
        io.write_outputs(target, np.zeros((4, 1000), np.float32))
    assert str(target) in str(caught.value) and "no space left on device" in str(caught.value)
    assert _listing(tmp_path) == ["o.npy"]
    assert target.read_bytes() == b"the previous outputs"  # the old file is untouched, not half replaced


def test_save_outputs_writes_exactly_the_named_path(tmp_path):
    """A regression guard, not a finding: np.save on a name would add .npy; through a handle it does not."""
    outputs = np.arange(12, dtype=np.float32).reshape(3, 4)
    io.write_outputs(tmp_path / "deep" / "out.bin", outputs)
    assert _listing(tmp_path) == ["deep", "deep/out.bin"]
    np.testing.assert_array_equal(np.load(tmp_path / "deep" / "out.bin"), outputs)


# ------------------------------------------------------------------ --table


def test_table_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    before = _listing(tmp_path)
    line = _refused(capsys, ["--network", SMALL_NETWORK, "--batch", "4", "--table", "a.txt/t.json"],
                    "--table a.txt/t.json")
    assert line == "error: --table a.txt/t.json: a.txt is a file, not a directory"
    assert _listing(tmp_path) == before


@pytest.mark.skipif(AS_ROOT, reason=ROOT_SKIP)
def test_table_in_a_read_only_directory(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = _refused(capsys, ["--network", SMALL_NETWORK, "--batch", "4", "--table", "ro/t.json"],
                        "--table ro/t.json")
        assert line == "error: --table ro/t.json: cannot write in ro (permission denied)"
        assert _listing(ro) == []
    finally:
        ro.chmod(0o755)


def test_existing_table_in_a_directory_that_refuses_writes_simulated(tmp_path, capsys, monkeypatch):
    """A table that exists but cannot be replaced (its directory takes no new files): refused before profiling,
    which would otherwise be lost when the table is saved."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "t.json").write_text('{"format": "hetero-profile-table", "version": 1, "profiles": {}}')
    before = _listing(tmp_path)
    _deny_writes_in(monkeypatch, ro)
    line = _refused(capsys, ["--network", SMALL_NETWORK, "--batch", "4", "--table", "ro/t.json"],
                    "--table ro/t.json")
    assert line == "error: --table ro/t.json: cannot write in ro (permission denied)"
    assert _listing(tmp_path) == before


def test_table_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "tables").mkdir()
    line = _refused(capsys, ["--network", SMALL_NETWORK, "--batch", "4", "--table", "tables"], "--table tables")
    assert "cannot read profile table" in line and "is a directory" in line
    assert _listing(tmp_path) == ["tables"]


# ------------------------------------------------------------------ --input


def _input_refused(capsys, tmp_path, name, *expected):
    before = _listing(tmp_path)
    line = _refused(capsys, ["--network", SMALL_NETWORK, "--input", name, "--table", "t.json"], f"--input {name}: ")
    for text in expected:
        assert text in line, line
    assert _listing(tmp_path) == before
    return line


def test_input_npz_archive(tmp_path, capsys):
    np.savez(tmp_path / "x.npz", a=np.zeros(2), b=np.ones(3))
    line = _input_refused(capsys, tmp_path, "x.npz", "a .npz archive (arrays a, b)",
                          "expected one .npy array of shape (N, 3, 224, 224)")
    assert "AttributeError" not in line


def test_input_text_file(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("1.0, 2.0, 3.0\n")
    line = _input_refused(capsys, tmp_path, "x.txt", "not a .npy file (it starts with text)",
                          "expected a .npy array saved with numpy.save")
    assert "pickle" not in line


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("missing.npy", None, "no such file"),
        ("folder", lambda p: p.mkdir(), "no .jpg, .jpeg or .png images in it"),
        ("empty.npy", lambda p: p.write_bytes(b""), "the file is empty"),
        ("objects.npy", lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True),
         "array of Python objects"),
        ("scalar.npy", lambda p: np.save(p, np.float32(3)), "a 0-d array"),
        ("flat.npy", lambda p: np.save(p, np.zeros((2, 3, 224), np.float32)),
         "a 3-d array of shape (2, 3, 224), expected a 4-d array of shape (N, 3, 224, 224)"),
        ("none.npy", lambda p: np.save(p, np.zeros((0, 3, 224, 224), np.float32)), "no samples"),
        ("short.npy", lambda p: p.write_bytes(_truncated_npy()), "truncated"),
        ("image.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32), "a PNG image"),
    ],
)
def test_input_that_is_not_a_batch(tmp_path, capsys, name, make, expected):
    if make is not None:
        make(tmp_path / name)
    _input_refused(capsys, tmp_path, name, expected)


def _truncated_npy() -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3, 224, 224), np.float32))
    return buffer.getvalue()[:1000]


def test_a_real_npy_input_is_still_mapped(tmp_path, monkeypatch):
    """Not a finding: the checks above must not read a real input into memory."""
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 224, 224), np.float32))
    seen = {}

    def recording(*args, **kwargs):
        seen.update(kwargs)
        raise ReachedInfer(args)

    monkeypatch.setattr(hetero.session, "infer", recording)
    with pytest.raises(ReachedInfer):
        cli.inference(["--network", SMALL_NETWORK, "--input", "x.npy", "--table", "t.json"])
    assert isinstance(seen["inputs"], np.memmap) and seen["inputs"].shape == (2, 3, 224, 224)
