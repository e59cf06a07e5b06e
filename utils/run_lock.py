"""One trainer per run folder: an OS lock on RUN_DIR/run.lock, held for the trainer's lifetime.

The lock is a POSIX record lock (fcntl.lockf) on the whole file. The kernel drops it when the
holding process ends, however it ends (SIGKILL, a crash; on a network file system with lock
support, the server's lease expires when a node dies), so a dead trainer never leaves the folder
locked. Two more properties decide the choice over flock: a POSIX lock is not inherited by
processes forked from the holder (DataLoader workers outlive a killed trainer by a few seconds
and would keep an flock held), and NFS and Lustre (mounted with flock) implement POSIX locks
across nodes. Its one trap is that closing any descriptor of the file in the holding process
drops the lock: only RunFolderLock opens the file, once. The file also records the holder's pid
and host, for the refusal message; it stays after the run ends (an unlocked file means nothing).
"""
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_NAME = "run.lock"


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class RunFolderLock:
    """An acquired lock on a run folder; release() (or process exit) frees it."""

    def __init__(self, run_dir: Path, fd: int, created_folder: bool):
        self.run_dir, self.fd, self.created_folder = run_dir, fd, created_folder

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def release(self, remove_folder: bool = False) -> None:
        """Unlock. remove_folder: also remove the folder when this lock created it and it holds
        nothing but the lock file (a run refused before it wrote anything leaves no folder)."""
        if self.fd is None:
            return
        if remove_folder and self.created_folder and [p.name for p in self.run_dir.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            os.close(self.fd)
            self.fd = None
            self.run_dir.rmdir()
            return
        os.close(self.fd)  # closing the only descriptor releases the POSIX lock
        self.fd = None


def _holder(path: Path) -> str:
    """'pid P on HOST' from the lock file, or a placeholder when it cannot be read."""
    try:
        record = json.loads(path.read_text())
        return f"pid {record['pid']} on {record['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def lock_run_folder(run_dir: Path) -> RunFolderLock:
    """Create run_dir if needed and take its lock without waiting. RunFolderBusy (one line,
    naming the folder and the holder) when another process holds it; ValueError when the file
    system offers no locks."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)  # held by another process: this process holds nothing, closing drops nothing
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise RunFolderBusy(f"run folder {run_dir} is in use by another trainer ({_holder(path)}); wait for it "
                                f"to end, or choose another --run-name") from None
        raise ValueError(f"cannot lock {path} ({e.strerror}): the results folder's file system offers no locks; "
                         f"use a --results-dir on one that does") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b"\n", 0)
    return RunFolderLock(run_dir, fd, created)

