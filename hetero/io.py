"""Writing output files safely: one run at a time into an output, and its disk space taken before any work.

A stream writes its outputs through a memory map of ``<output>.partial``. Two runs into one output would
overwrite each other's samples and race to rename the partial file, so each run holds an exclusive lock
on ``<output>.lock`` while it streams. A memory map is written page by page as chunks finish, and a page
the disk has no room for is a SIGBUS, which kills the process without a word; so the partial file's whole
size is reserved on disk before the first chunk, and a full disk is a one-line error instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from .errors import HeteroError, one_line

log = logging.getLogger(__name__)

LOCK, PARTIAL = ".lock", ".partial"
SPARE_BYTES = 1 << 20  # left free beside the reserved outputs for the record of samples done, rewritten per chunk


def lock_file(path: Path, wait: bool) -> int | None:
    """An open descriptor holding an exclusive flock on the file at `path` (created if missing), or None where
    another process holds it and `wait` is false.

    flock goes with the open file, so a lock file left by a killed process blocks no one. A holder may remove
    the file as it releases it (as :func:`output_lock` does), after another process opened it but before that
    one's flock is granted: that process then holds a file no longer at `path`, so it checks, and tries again.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (at_path.st_dev, at_path.st_ino) == (held.st_dev, held.st_ino)


def _this_run() -> str:
    """This process as another run's refusal names it: pid, host, command line (one line)."""
    command = shlex.join(sys.orig_argv).replace("\n", "\\n")
    return f"pid {os.getpid()} on {socket.gethostname()}: {command}"


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `output` for this run alone: a HeteroError naming the run that holds it instead of waiting for
    it (a stream may run for hours). The lock file, which names this run to the refused, goes on release."""
    path = output.with_name(output.name + LOCK)
    fd = lock_file(path, wait=False)
    if fd is None:
        try:
            holder = path.read_text(errors="replace").strip()
        except FileNotFoundError:  # released this instant
            holder = ""
        raise HeteroError(f"{output}: another run is writing into it ({holder or f'it holds {path.name}'}); wait "
                          f"for it to end or pick another output")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, _this_run().encode())
        yield
    finally:
        # removed while still held, and only if it is still ours, so that no run that waits ever locks a
        # file at no path or loses one that another run just made
        if _same_file(path, fd):
            with suppress(FileNotFoundError):
                path.unlink()
        os.close(fd)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _free_bytes(path: Path) -> int:
    """The space free on the file system of `path` to users other than root, as df shows it."""
    volume = os.statvfs(path)
    return volume.f_bavail * volume.f_frsize


def _reserve(path: Path, output: Path) -> None:
    """Allocate every block of the file at `path` on its disk, so that writing it through a memory map cannot
    run out of space (a SIGBUS), and see that SPARE_BYTES stay free; a HeteroError where the disk has no room.
    Blocks already allocated (a resumed run's) are kept, and count as reserved."""
    with open(path, "r+b") as file:
        info = os.fstat(file.fileno())
        needs = max(info.st_size - info.st_blocks * 512, 0) + SPARE_BYTES
        free = _free_bytes(path)  # before: what the message shows, whatever a failed allocation left taken
        try:
            os.posix_fallocate(file.fileno(), 0, info.st_size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _no_room(output, needs, free) from None
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):  # a file system that cannot: run as before
                log.warning("%s: disk space for the outputs cannot be reserved on this file system (%s)", output,
                            exc.strerror)
                return
            raise HeteroError(f"{output}: cannot reserve disk space for the outputs ({exc.strerror})") from None
        if _free_bytes(path) < SPARE_BYTES:
            raise _no_room(output, needs, free)


def _no_room(output: Path, needs: int, free: int) -> HeteroError:
    return HeteroError(f"{output}: not enough disk space for the outputs (needs {_size(needs)}, {_size(free)} free)")


def open_partial(output: Path, dtype: np.dtype, shape: tuple[int, ...], record: Path | None) -> np.memmap:
    """The outputs memory-mapped from the .npy file "<output>.partial", its space reserved (:func:`_reserve`):
    the file that the interrupted run of `record` (its record of the samples done) left, or without a record a
    new one, replacing any there. A file this call made is removed again if its space could not be reserved."""
    path = output.with_name(output.name + PARTIAL)
    if record is not None:
        start_again = f"remove it and {record.name} to start again"
        try:
            outputs = np.lib.format.open_memmap(path, mode="r+")
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else one_line(exc)
            raise HeteroError(f"{output}: cannot open {path.name}, which holds the samples that {record.name} "
                              f"records as done ({why}); {start_again}") from None
        if outputs.shape != shape or outputs.dtype != dtype:
            raise HeteroError(f"{output}: {path.name} holds outputs of shape {outputs.shape} ({outputs.dtype}), "
                              f"not {shape} ({np.dtype(dtype)}); {start_again}")
        _reserve(path, output)
        return outputs
    try:
        outputs = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        _reserve(path, output)
    except BaseException as exc:
        with suppress(FileNotFoundError):
            path.unlink()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # not even the header fitted
            raise HeteroError(f"{output}: not enough disk space for the outputs ({exc.strerror})") from None
        raise
    return outputs
