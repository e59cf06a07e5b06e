"""Disk space for large outputs: blocks reserved when a file is created, and one line that says
what happened when the disk is full.

A memory-mapped output (np.lib.format.open_memmap) starts as a sparse file; a write into a page
whose block the file system cannot allocate kills the process with SIGBUS ("Bus error"), which
no Python code can catch. Reserving the blocks at creation (posix_fallocate) moves that failure
to the start, where it is an ordinary ENOSPC that names the file and the space it needs.
"""
import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# posix_fallocate cannot reserve on this file system (some network file systems): writes then
# allocate as they go, as without preallocation.
UNSUPPORTED_ERRNOS = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class NoSpaceError(OSError):
    """The disk (or quota) is full; str() is the one-line message for the user."""


def readable_size(nbytes: int) -> str:
    """Bytes in the largest decimal unit that keeps a leading digit: 6.55 GB, 5.12 MB, 900 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def no_space_message(path: Union[str, Path], nbytes: int) -> str:
    return f"no space left on device for {path} (needs {readable_size(nbytes)}): free space and rerun"


def preallocate(path: Union[str, Path], nbytes: int | None = None) -> None:
    """Reserve the blocks of the first nbytes (default: the file's size) of an existing file.
    NoSpaceError (one line) when the disk cannot hold them; the file is then removed, so the
    failed attempt leaves no space taken."""
    path = Path(path)
    nbytes = path.stat().st_size if nbytes is None else nbytes
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            os.close(fd)
            fd = -1
            path.unlink(missing_ok=True)
            raise NoSpaceError(no_space_message(path, nbytes)) from None
        if e.errno not in UNSUPPORTED_ERRNOS:
            raise
    finally:
        if fd >= 0:
            os.close(fd)


@contextmanager
def reporting_no_space(path: Union[str, Path], nbytes: int) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside the block (a write, a flush, a rename) into NoSpaceError
    naming path and the bytes it needs."""
    try:
        yield
    except NoSpaceError:
        raise
    except OSError as e:
        if e.errno in NO_SPACE_ERRNOS:
            raise NoSpaceError(no_space_message(path, nbytes)) from None
        raise
