"""Cheap identity of large data files: a SHA-256 taken once, when the file is written, plus the
file's size and modification time at that moment; opening compares only the two.

    recorded = {"sha256": ..., "stat": {"size": ..., "mtime_ns": ...}}   (record_file)
    check_recorded_file(path, recorded, verify=False)                     (on open)

On open: a different size means different content and is refused; a different mtime (the file
was rewritten, or copied without keeping times) triggers one full re-hash, which refuses changed
content and otherwise returns the new stat to record. verify=True re-hashes whatever the stat
says: it also catches a same-size rewrite whose mtime was set back. What the stat check cannot
see: a same-size rewrite within the file system's mtime resolution, or with its mtime restored.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Union

HASH_CHUNK = 1 << 24


def update_sha256(digest: "hashlib._Hash", path: Union[str, Path], chunk: int = HASH_CHUNK) -> None:
    """Feed the bytes of one file into digest, streamed."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


def file_sha256(path: Union[str, Path], chunk: int = HASH_CHUNK) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    update_sha256(digest, path, chunk)
    return digest.hexdigest()


def files_sha256(paths: Iterable[Union[str, Path]]) -> str:
    """SHA-256 hex digest of the files' bytes, concatenated in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        update_sha256(digest, path)
    return digest.hexdigest()


def file_stat(path: Union[str, Path]) -> dict:
    """{"size": bytes, "mtime_ns": modification time}: what the cheap check compares (no inode,
    so a copy that keeps times, rsync -a or cp -p, still passes)."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def record_file(path: Union[str, Path]) -> dict:
    """{"sha256", "stat"} of a finished file: hashed once, here."""
    stat = file_stat(path)
    return {"sha256": file_sha256(path), "stat": stat}


def note(message: str) -> None:
    """One line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def check_recorded_file(path: Union[str, Path], recorded: dict, verify: bool = False,
                        remedy: str = "") -> Optional[dict]:
    """ValueError (one line) unless the file at path still has the recorded content.

    recorded: {"sha256", "stat"} from record_file. Returns None when the record still holds, or
    the file's new stat when it was re-hashed, matched, and its stat changed (the caller may
    record it so the next open is cheap again)."""
    path = Path(path)
    current = file_stat(path)
    suffix = f"; {remedy}" if remedy else ""
    if current["size"] != recorded["stat"]["size"]:
        raise ValueError(f"{path} changed after its hash was recorded ({current['size']} bytes, "
                         f"recorded {recorded['stat']['size']}){suffix}")
    if not verify and current["mtime_ns"] == recorded["stat"]["mtime_ns"]:
        return None
    why = "verifying" if verify else "modified or copied since its hash was recorded (mtime differs): re-hashing"
    note(f"{path}: {why} ({current['size'] / 1e9:.2f} GB)")
    actual = file_sha256(path)
    if actual != recorded["sha256"]:
        raise ValueError(f"{path} changed after its hash was recorded (sha256 {actual[:12]}, recorded "
                         f"{recorded['sha256'][:12]}){suffix}")
    return current if current != recorded["stat"] else None


def write_json_atomic(path: Union[str, Path], obj: Any) -> None:
    """Write JSON via a temporary file (unique per process) and rename: readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def try_write_json_atomic(path: Union[str, Path], obj: Any) -> bool:
    """write_json_atomic, or False with a note when the folder is not writable (read-only data)."""
    try:
        write_json_atomic(path, obj)
        return True
    except OSError as e:
        note(f"could not update {path} ({e.strerror}); the next open will re-hash again")
        return False


def path_state(path: Union[str, Path]) -> Optional[tuple]:
    """(device, inode, size, mtime_ns) of the file at path, or None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileChange(NamedTuple):
    """Why the file at a watched path is no longer the watched one. replaced: the path names a new
    file (renamed over it, or removed), so a reader's memory map of the old one still reads the
    old bytes; otherwise the file was rewritten in place and a map reads the new bytes."""
    message: str
    replaced: bool


class FileWatch:
    """Notices when the file at a path stops being the one a reader opened.

    A reader that memory-maps a file keeps reading the inode it mapped: an atomic switch (a new
    file renamed over the path) leaves its view intact but means the path now names other data;
    an in-place rewrite changes the view itself. check() compares the path's inode, size and
    mtime with those seen at start (a stat: cheap enough for every log step) and, when they
    differ, re-hashes the file once: the same bytes under a new stat pass (and become the stat
    compared next), other bytes give a FileChange. sha256: the watched content's digest."""

    def __init__(self, path: Union[str, Path], sha256: str, seen: Optional[tuple] = None):
        """seen: the path's state (path_state) when the reader opened it; default now."""
        self.path, self.sha256 = Path(path), sha256
        self.seen = path_state(self.path) if seen is None else seen

    def check(self) -> Optional[FileChange]:
        """None while the path holds the watched content."""
        now = path_state(self.path)
        if now == self.seen:
            return None
        if now is None:
            return FileChange(f"{self.path} was removed", replaced=True)
        actual = file_sha256(self.path)
        if actual != self.sha256:
            replaced = self.seen is None or now[:2] != self.seen[:2]
            how = "replaced by another file" if replaced else "rewritten in place"
            return FileChange(f"{self.path} was {how} (sha256 {actual[:12]}, this run's {self.sha256[:12]})", replaced)
        self.seen = now
        return None
