"""Outputs are safe: one run at a time streams into an output, and a disk without room for the outputs is
refused before any work, in one line, leaving nothing behind (hetero.io)."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from hetero.errors import HeteroError
from hetero.io import lock_file, output_lock
from hetero.session import stream
from hetero.stream import PARTIAL, PROGRESS

from .conftest import ROOT
from .test_models import tiny_onnx, tiny_reference
from .test_reliability import FaultyEngine

pytest.importorskip("onnx")

LOCK = ".lock"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny ONNX network, and one profile table for the module's runs, so that each profiles once."""
    folder = tmp_path_factory.mktemp("tiny")
    weights = tiny_onnx(folder / "tiny.onnx")
    return folder / "tiny.onnx", weights, folder / "t.json"


def _inputs(path, samples):
    """Samples whose first value is their index (FaultyEngine faults pick samples by it)."""
    x = np.random.default_rng(1).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(samples)
    np.save(path, x)
    return x


def _stream(tiny, folder, **options):
    model, _, table = tiny
    return stream(str(model), "cpu", folder / "x.npy", folder / "y.npy", table=table, profile_batches=[1, 8, 64],
                  progress=False, **options)


def _never_loaded(network, device):
    pytest.fail("an engine was loaded: the run was not refused before any work")


def _files(folder):
    """Every file of `folder` by name, with a digest of its bytes and its modification time."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def _no_space(fd, offset, length):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_second_run_into_a_held_output_is_refused_naming_the_holder(tmp_path, tiny):
    _inputs(tmp_path / "x.npy", 300)
    for name, text in (("y.npy", "an older output"), (f"y.npy{PARTIAL}", "its samples"), (f"y.npy{PROGRESS}", "{}")):
        (tmp_path / name).write_text(text)
    with output_lock(tmp_path / "y.npy"):
        before = _files(tmp_path)
        with pytest.raises(HeteroError) as refused:
            _stream(tiny, tmp_path, load=_never_loaded)
        assert _files(tmp_path) == before, "the refused run changed the holder's files"
    message = str(refused.value)
    assert "another run is writing into it" in message and f"pid {os.getpid()} " in message
    assert "pytest" in message and "\n" not in message, "the holder's command line, on one line"
    assert not (tmp_path / f"y.npy{LOCK}").exists(), "the holder removes its lock file as it lets go"


def test_the_command_line_refuses_a_second_stream_into_an_output_in_one_line(tmp_path, tiny):
    """Two processes stream into one --output, started together: the one that takes the lock is stopped
    (SIGSTOP) holding it, the other is refused, and the first, continued, finishes as if alone."""
    model, weights, table = tiny
    x = _inputs(tmp_path / "x.npy", 300)
    command = [sys.executable, str(ROOT / "Inference.py"), "--network", str(model), "--input", str(tmp_path / "x.npy"),
               "--output", str(tmp_path / "y.npy"), "--stream", "--table", str(table), "--profile-batches", "1,8,64",
               "--no-progress"]
    runs = [subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    lock = tmp_path / f"y.npy{LOCK}"
    try:
        deadline = time.monotonic() + 120
        while not (holding := [run for run in runs if f"pid {run.pid} " in _text_or_nothing(lock)]):
            assert time.monotonic() < deadline, "no run took the lock"
            time.sleep(0.002)
        holder, refused = holding[0], next(run for run in runs if run is not holding[0])
        holder.send_signal(signal.SIGSTOP)
        assert f"pid {holder.pid} " in _text_or_nothing(lock), "the holder ran to its end before it could be stopped"
        refused.wait(timeout=120)
    finally:
        for run in runs:
            run.send_signal(signal.SIGCONT)
    _, refusal = refused.communicate()
    _, err = holder.communicate(timeout=120)
    assert refused.returncode == 1 and refusal.count("\n") == 1, refusal
    assert refusal.startswith(f"error: {tmp_path / 'y.npy'}: another run is writing into it (pid {holder.pid} ")
    assert "Inference.py --network" in refusal
    assert holder.returncode == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


def _text_or_nothing(path):
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.parametrize("full", ["no room for the outputs", "no room beside them"])
def test_a_full_disk_is_refused_before_any_work_leaving_nothing(tmp_path, tiny, monkeypatch, full):
    _inputs(tmp_path / "x.npy", 300)
    if full == "no room for the outputs":
        monkeypatch.setattr(os, "posix_fallocate", _no_space)
    else:  # the outputs fit, but not the record of samples done that the stream rewrites beside them
        monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=100, f_frsize=4096))
    with pytest.raises(HeteroError, match=r"y\.npy: not enough disk space for the outputs \(needs 1\.0 MiB, "
                                          r"(0\.4 MiB|\d+\.\d (M|G)iB) free\)$"):
        _stream(tiny, tmp_path, load=_never_loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_a_full_file_system_is_refused_in_one_line_not_a_bus_error(tmp_path, tiny):
    """On a real file system too small for the outputs (a 64 KiB tmpfs mounted in a namespace of the
    test's own, where the kernel allows that): without the reservation, writing the memory map would die of
    SIGBUS."""
    model, _, table = tiny
    folder = tmp_path / "small"
    folder.mkdir()
    mount = 'mount -t tmpfs -o size=64k hetero-test "$0" || exit 99'
    namespace = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    if shutil.which("unshare") is None or subprocess.run([*namespace, mount, folder], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here (unshare, user namespaces)")
    _inputs(tmp_path / "x.npy", 8000)  # 160 kB of outputs
    command = [sys.executable, ROOT / "Inference.py", "--network", model, "--input", tmp_path / "x.npy", "--output",
               folder / "y.npy", "--stream", "--table", table, "--profile-batches", "1,8,64", "--no-progress"]
    run = subprocess.run([*namespace, f'{mount}; "$@"; status=$?; echo "left:$(ls -A "$0")"; exit $status', folder,
                          *command], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=300)
    assert run.returncode == 1, f"status {run.returncode}: {run.stderr}"
    assert run.stderr.startswith(f"error: {folder / 'y.npy'}: not enough disk space for the outputs (needs ")
    assert run.stderr.count("\n") == 1 and run.stdout.strip() == "left:", run.stdout


def test_an_interrupted_stream_resumes_into_its_reserved_partial_file(tmp_path, tiny, monkeypatch):
    """A run whose device fails at sample 200 keeps what it did; a resume into a disk without room, or without
    the partial file, is refused leaving the record and the partial file as they were; the real resume
    reserves the partial file's space too and completes it. No run leaves its lock file."""
    _, weights, _ = tiny
    x = _inputs(tmp_path / "x.npy", 600)
    with pytest.raises(HeteroError, match="samples could not run"):
        _stream(tiny, tmp_path, load=lambda net, device: FaultyEngine(
            net, device, lambda batch: RuntimeError("lost") if batch[:, 0, 0, 0].max() >= 200 else None))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", f"y.npy{PARTIAL}", f"y.npy{PROGRESS}"]
    interrupted = _files(tmp_path)
    partial = tmp_path / f"y.npy{PARTIAL}"
    partial_bytes = partial.stat().st_size

    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fallocate", _no_space)
        with pytest.raises(HeteroError, match="not enough disk space for the outputs"):
            _stream(tiny, tmp_path, load=_never_loaded)
    partial.rename(tmp_path / "aside")
    with pytest.raises(HeteroError, match=rf"cannot open y\.npy{PARTIAL}, which holds the samples that "
                                          rf"y\.npy{PROGRESS} records as done \(No such file or directory\)"):
        _stream(tiny, tmp_path, load=_never_loaded)
    (tmp_path / "aside").rename(partial)
    assert _files(tmp_path) == interrupted, "a refused resume changed the interrupted run's files"

    reserved = []

    def recorded_fallocate(fd, offset, length):
        reserved.append((os.readlink(f"/proc/self/fd/{fd}"), length))
        real_fallocate(fd, offset, length)

    real_fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", recorded_fallocate)
    report = _stream(tiny, tmp_path)
    assert 0 < report.resumed < 600 and report.computed == 600 - report.resumed
    assert reserved == [(str(partial), partial_bytes)], "the partial file of the earlier run reserved whole"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), tiny_reference(x, weights), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


def test_a_lock_file_left_by_a_killed_run_blocks_no_one(tmp_path, tiny):
    _inputs(tmp_path / "x.npy", 100)
    (tmp_path / f"y.npy{LOCK}").write_text("pid 12345 on elsewhere: a run killed with its lock file")
    assert _stream(tiny, tmp_path).computed == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "y.npy"]


def test_a_run_waiting_for_a_lock_its_holder_removes_locks_the_file_then_there(tmp_path):
    """The waiting run opened the lock file before its holder removed it on release: it must not end up
    holding that removed file (a third run would create a new one and lock it too), but the one at the path."""
    path = tmp_path / "table.json.lock"
    got = []
    with output_lock(tmp_path / "table.json"):
        waiting = threading.Thread(target=lambda: got.append(lock_file(path, wait=True)))
        waiting.start()
        time.sleep(0.2)  # the waiting thread has opened the file and waits in flock
    waiting.join(5)
    try:
        assert os.fstat(got[0]).st_ino == os.stat(path).st_ino
    finally:
        os.close(got[0])
