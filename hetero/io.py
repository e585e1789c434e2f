"""hetero's files: reading inputs, writing outputs atomically, checking before any work that they can be written.

- Inputs (:func:`read_inputs`): a .npy file is sniffed (magic bytes, then the header's dtype and shape) and
  memory-mapped, never read whole; a folder is its images.  Anything else is refused in words.
- Writes (:func:`write_atomically`): a temporary file beside the target, flushed to disk and renamed over it,
  so that a reader or a run after a crash finds the old file or the new one, never half of one.  The outputs
  of a run (:func:`write_outputs`), the profile table and a stream's record of the samples done go through it.
- Checks (:func:`checked_path`, :func:`check_output`, :func:`check_table`): a destination the run could not
  create or replace at the end is refused before anything is compiled or profiled.
- A stream writes its outputs through a memory map of ``<output>.partial``. Two runs into one output would
  overwrite each other's samples and race to rename the partial file, so each run holds an exclusive lock
  on ``<output>.lock`` while it streams (:func:`output_lock`). A memory map is written page by page as chunks
  finish, and a page the disk has no room for is a SIGBUS, which kills the process without a word; so the
  partial file's whole size is reserved on disk before the first chunk (:func:`open_partial`), and a full
  disk is a one-line error instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import shlex
import socket
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import HeteroError, UsageError, one_line
from .images import ImageFolder

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


# ------------------------------------------------------------------ reading inputs

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


def read_inputs(shown: str, path: Path, sample: tuple[int, ...] | None,
                image_shape: Callable[[], tuple[int, ...]]) -> np.ndarray | ImageFolder:
    """The --input file memory-mapped (not read: a dataset larger than memory is copied share by share, chunk by
    chunk), after sniffing what it is so that anything else is refused in words: its magic bytes, then the .npy
    header's dtype and shape (as many dimensions as a batch of `sample`, where it is known), before anything is
    mapped.  A folder is its JPEG and PNG images, decoded to samples of `image_shape()` as they are read.
    Refusals are UsageErrors naming `shown`, the path as the user typed it."""
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
        try:
            return ImageFolder(path, image_shape())
        except HeteroError as exc:
            raise refuse(str(exc).removeprefix(f"{path}: ")) from None
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


def read_named_inputs(shown: str, path: Path) -> dict[str, np.ndarray]:
    """The --input .npz archive of a network of named inputs (numpy.savez's), its arrays by name, read whole: an
    archive's members cannot be memory-mapped, and such a batch of token ids is small. Whether the names and shapes
    fit the network is Network.check_inputs's to say; refusals here are UsageErrors naming `shown`."""

    def refuse(what: str) -> UsageError:
        return UsageError(f"--input {shown}: cannot read inputs: {what}")

    try:
        if not zipfile.is_zipfile(path):
            raise refuse("not a .npz archive of arrays by name, as numpy.savez writes")
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except UsageError:
        raise
    except FileNotFoundError:
        raise refuse("no such file") from None
    except OSError as exc:
        raise refuse(_reason(exc)) from None
    except Exception as exc:  # numpy raises many types for a damaged member or one of Python objects
        raise refuse(f"a damaged .npz archive ({one_line(exc)})") from None


# ------------------------------------------------------------------ writing files, and checking paths first

def _reason(exc: OSError) -> str:
    """An OSError as the few words after a path: "permission denied", "no space left on device"."""
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
    return text[:1].lower() + text[1:]


def _shown(folder: Path) -> str:
    return "the current directory" if str(folder) == "." else str(folder)


def write_atomically(path: Path, write: Callable[[BinaryIO], object], mode: int | None = None) -> None:
    """Write the file at `path` through `write` (handed the open file) into a temporary file beside it, flushed to
    disk, then renamed over `path`: a reader, or a run after a crash, finds the old file or the new one, never
    half of one, and a failure leaves nothing behind.  The file gets `mode`, else the old file's, else what a
    plain write would give it (0666 less the umask; mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _plain_mode(path) if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _plain_mode(path: Path) -> int:
    """The mode a plain write of `path` leaves: the old file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_outputs(path: Path, outputs: np.ndarray, shown: str | None = None) -> None:
    """Write the outputs as a .npy file exactly at `path` (no .npy appended), atomically (:func:`write_atomically`),
    so an interrupted run never leaves half a file. A failure is a HeteroError naming `shown` (the user's spelling
    of the path), never the temporary file."""
    shown = str(path) if shown is None else shown
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda handle: np.save(handle, outputs))
    except OSError as exc:
        what = "is a directory" if isinstance(exc, IsADirectoryError) else f"cannot write ({_reason(exc)})"
        raise HeteroError(f"--output {shown}: {what}") from None


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


def check_output(shown: str, path: Path) -> None:
    """--output: a file that does not exist or a regular file to replace, in a folder where the run can write."""
    info = _stat_or_none(path)
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UsageError(f"--output {shown}: is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise UsageError(f"--output {shown}: not a regular file (the outputs would replace it)")
    if shown.endswith(("/", os.sep)):
        raise UsageError(f"--output {shown}: names a directory; expected a file path such as {shown}outputs.npy")
    _check_writable_destination("--output", shown, path)


def check_table(shown: str, path: Path) -> None:
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
    lock = path.with_name(path.name + LOCK)
    if os.path.lexists(lock):
        try:
            os.close(os.open(lock, os.O_RDWR))
        except OSError as exc:
            raise UsageError(f"--table {shown}: cannot open its lock file {lock} ({_reason(exc)})") from None


def checked_path(flag: str, text: str | os.PathLike[str], check: Callable[[str, Path], None]) -> Path:
    shown = os.fspath(text)
    if "\0" in shown:
        raise UsageError(f"{flag} {shown}: not a valid path (it contains a NUL character)")
    if not shown:
        raise UsageError(f"{flag}: the path is empty")
    path = Path(shown)
    check(shown, path)
    return path
