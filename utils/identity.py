"""What names the project's data and weights, and the checks that refuse a mismatch.

- A large file (codes.npy, entropy.npy) is hashed once, when it is written (record_file:
  {"sha256", "stat": {"size", "mtime_ns"}}); opening compares only size and mtime
  (check_recorded_file): another size is refused, another mtime (rewritten, or copied without
  keeping times) re-hashes once, refusing changed content. verify=True (--verify-store) always
  re-hashes: it also catches a same-size rewrite whose mtime was restored.
- A code store (code_store_hash): a hash of its manifest's facts, which include codes_sha256,
  after the check of codes.npy above. LlamaGen's per-file layout has no manifest: its identity
  hashes the folder name, the image count and LLAMAGEN_SAMPLE files at evenly spaced indices
  (a change to an unsampled file goes unseen; extract the images into this layout for more).
- Entropies (check_entropy_record): entropy.json names the code store and the entropy model
  they were made for, and records entropy.npy; other codes, another model or a changed file
  are refused.
- A checkpoint (checkpoint_sha256): its file's bytes, or an FSDP directory's files; weights
  (weights_identity): a release folder keeps the hash of the checkpoint it came from.
- A run's inputs (FileWatch): a stat per check, a hash only after a change, so a run notices
  codes or entropies switched or rewritten under it.
"""
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np

from utils.release import WEIGHTS_NAME, is_weights_folder, read_config

HASH_CHUNK = 1 << 24
MANIFEST = "manifest.json"
CODES = "codes.npy"
CODES_HASH = "codes_sha256"  # SHA-256 of codes.npy, taken once when the store is finalized
CODES_STAT = "codes_stat"  # {"size", "mtime_ns"} of codes.npy when CODES_HASH was taken
MAX_CODE = "max_code"  # largest stored code: derived from the codes, not part of the identity
LLAMAGEN_SAMPLE = 64  # files hashed for the identity of LlamaGen's layout
PathLike = Union[str, Path]


def note(message: str) -> None:
    """One line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def update_sha256(digest: "hashlib._Hash", path: PathLike, chunk: int = HASH_CHUNK) -> None:
    """Feed the bytes of one file into digest, streamed."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


def file_sha256(path: PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    update_sha256(digest, path)
    return digest.hexdigest()


def file_stat(path: PathLike) -> dict:
    """{"size": bytes, "mtime_ns": modification time}: what the cheap check compares (no inode,
    so a copy that keeps times, rsync -a or cp -p, still passes)."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def record_file(path: PathLike) -> dict:
    """{"sha256", "stat"} of a finished file: hashed once, here."""
    stat = file_stat(path)
    return {"sha256": file_sha256(path), "stat": stat}


def check_recorded_file(path: PathLike, recorded: dict, verify: bool = False, remedy: str = "") -> Optional[dict]:
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


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """Write JSON via a temporary file (unique per process) and rename: readers never see half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def try_write_json_atomic(path: PathLike, obj: Any) -> bool:
    """write_json_atomic, or False with a note when the folder is not writable (read-only data)."""
    try:
        write_json_atomic(path, obj)
        return True
    except OSError as e:
        note(f"could not update {path} ({e.strerror}); the next open will re-hash again")
        return False


# ---------------------------------------------------------------------------------------
# Code stores
# ---------------------------------------------------------------------------------------
def numbered_files(folder: Path) -> int:
    """Number of files folder/<i>.npy; ValueError unless they are exactly 0..N-1."""
    numbers = sorted(int(m.group(1)) for f in os.listdir(folder) if (m := re.fullmatch(r"(\d+)\.npy", f)))
    if not numbers:
        raise ValueError(f"no <i>.npy files in {folder}")
    if numbers != list(range(len(numbers))):
        raise ValueError(f"{folder}: files are not numbered 0..{len(numbers) - 1} (a gap or extra index)")
    return len(numbers)


def llamagen_folders(path: Path) -> tuple[str, Path, Path]:
    """(name, codes folder, labels folder) of a LlamaGen-layout store at path."""
    candidates = sorted(p for p in path.iterdir() if p.is_dir() and p.name.endswith("_codes"))
    if not candidates:
        raise ValueError(f"not a code store: {path} has no {MANIFEST} and no <name><size>_codes folder")
    if len(candidates) > 1:
        raise ValueError(f"{path} holds several code folders ({', '.join(p.name for p in candidates)}): "
                         f"point to a directory with one")
    name = candidates[0].name[:-len("_codes")]
    labels = path / f"{name}_labels"
    if not labels.is_dir():
        raise ValueError(f"{path}: {candidates[0].name} has no matching {labels.name} folder")
    return name, candidates[0], labels


def code_store_hash(path: PathLike, verify: bool = False) -> str:
    """The store's identity, a SHA-256 hex digest (see the module docstring): from the manifest
    after a size-and-mtime check of codes.npy, or with verify=True after re-hashing it.
    ValueError (one line) when codes.npy changed after its hash was recorded."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return _llamagen_identity(path, verify)
    manifest = json.loads((path / MANIFEST).read_text())
    if CODES_HASH not in manifest:
        raise ValueError(f"code store {path}: {MANIFEST} records no {CODES_HASH}; re-extract the code store")
    recorded = {"sha256": manifest[CODES_HASH], "stat": manifest[CODES_STAT]}
    remedy = "re-extract the code store (entropies and models of the old codes do not fit it)"
    new_stat = check_recorded_file(path / CODES, recorded, verify, remedy)
    if new_stat is not None:
        try_write_json_atomic(path / MANIFEST, {**manifest, CODES_STAT: new_stat})
    facts = {k: v for k, v in manifest.items() if k not in (CODES_STAT, MAX_CODE)}
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"dpar code store\0" + text.encode()).hexdigest()


def _llamagen_identity(path: Path, verify: bool) -> str:
    """Identity of LlamaGen's layout: folder name, image count and LLAMAGEN_SAMPLE files evenly
    spaced over the indices, in index order."""
    name, codes_dir, _ = llamagen_folders(path)
    count = numbered_files(codes_dir)
    if verify:
        note(f"code store {path} has LlamaGen's layout, which records no hash to verify against; its identity "
             f"samples {min(LLAMAGEN_SAMPLE, count)} of {count} files")
    indices = np.unique(np.linspace(0, count - 1, min(LLAMAGEN_SAMPLE, count)).round().astype(np.int64))
    digest = hashlib.sha256(f"llamagen code store\0{name}\0{count}".encode())
    for i in indices.tolist():
        digest.update(f"\0{i}\0".encode())
        update_sha256(digest, codes_dir / f"{i}.npy")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Entropies
# ---------------------------------------------------------------------------------------
def check_entropy_record(folder: PathLike, record: dict, code_store: str, entropy_model: Optional[str] = None,
                         verify: bool = False) -> dict:
    """ValueError (one line) unless entropy.json's record (read from folder) names this code
    store's identity and, when given, this entropy model's, and entropy.npy still is the file
    the scorer hashed (verify: re-hash it). Returns the record, with entropy.npy's new stat
    when it was re-hashed and matched (also written back to entropy.json)."""
    expected = {"code_store_hash": (code_store, "code store"), "entropy_model_hash": (entropy_model, "entropy model")}
    for key, (value, what) in expected.items():
        if value is not None and record.get(key) != value:
            raise ValueError(f"entropies in {folder} were made for {what} {str(record.get(key))[:16]}, "
                             f"not {value[:16]}; rescore them")
    if not isinstance(record.get("entropy_file"), dict):
        raise ValueError(f"{Path(folder) / 'entropy.json'} records no hash of entropy.npy; rescore the code store")
    new_stat = check_recorded_file(Path(folder) / "entropy.npy", record["entropy_file"], verify,
                                   remedy="rescore the code store")
    if new_stat is None:
        return record
    record = {**record, "entropy_file": {**record["entropy_file"], "stat": new_stat}}
    try_write_json_atomic(Path(folder) / "entropy.json", record)
    return record


# ---------------------------------------------------------------------------------------
# Checkpoints and weights
# ---------------------------------------------------------------------------------------
def checkpoint_sha256(path: PathLike) -> str:
    """SHA-256 naming a checkpoint: of the file's bytes, or for an FSDP directory of its files'
    relative names and bytes in name order."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + file_sha256(f).encode())
    return digest.hexdigest()


def weights_identity(path: PathLike) -> str:
    """The SHA-256 that names a model's weights: checkpoint_sha256 of a checkpoint; for a weights
    folder (utils/release.py) the hash of the checkpoint it was exported from (config.json
    "source"), else of its model.safetensors. An exported entropy model or VQ therefore keeps
    the identity that training and code extraction recorded."""
    path = Path(path)
    if is_weights_folder(path):
        source = read_config(path).get("source")
        if isinstance(source, dict) and source.get("sha256"):
            return str(source["sha256"])
        return file_sha256(path / WEIGHTS_NAME)
    return checkpoint_sha256(path)


def check_weights_identity(path: PathLike, expected: Optional[str], flag: str, what: str,
                           shown: Optional[str] = None) -> str:
    """weights_identity(path); when expected is given and differs, a one-line ValueError
    "{flag} {shown or path} (sha256 ...) is not {what} (sha256 ...)": the entropy model or the VQ a
    model records, refused in sampling and in a release."""
    actual = weights_identity(path)
    if expected and actual != expected:
        raise ValueError(f"{flag} {shown or path} (sha256 {actual[:12]}) is not {what} (sha256 {expected[:12]})")
    return actual


# ---------------------------------------------------------------------------------------
# Inputs watched under a run
# ---------------------------------------------------------------------------------------
def path_state(path: PathLike) -> Optional[tuple]:
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

    def __init__(self, path: PathLike, sha256: str, seen: Optional[tuple] = None):
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
