"""Code store: VQ codes of an image dataset, written once by extract_codes.py, read by training.

Layout (one directory per dataset, image size and augmentation):
    manifest.json  image_size, grid_height, grid_width, codebook_size, num_views, count,
                   tokenizer_hash, codes_sha256, codes_stat, max_code, ... (written last and
                   atomically: no manifest = incomplete)
    codes.npy      (N, views, T) uint16, T = grid_height * grid_width, raster order
    labels.npy     (N,) int64
Readers also accept LlamaGen's layout, a directory holding `<name><size>_codes/<i>.npy`
((1, views, T) each) and `<name><size>_labels/<i>.npy`. It has no manifest: the grid comes
from T (square) and the codebook size must be given.

Identity: utils.identity.code_store_hash (codes.npy is hashed once, when the store is
finalized; the manifest keeps the digest, codes_sha256, and the file's size and mtime, codes_stat).

Codes inside the codebook: the writer refuses a code >= the codebook size it was given, and
finalize() scans codes.npy once and records its largest code (max_code; not part of the
identity, which codes_sha256 already follows). Opening refuses a store whose max_code is not
below its codebook size; it re-scans codes.npy (in chunks) when the manifest records no max_code
or the file is small (up to SCAN_ON_OPEN_BYTES). LlamaGen's layout records nothing, so opening
it reads every file once (a note on stderr says so for large stores: extracting the images into
this layout avoids it). Each refusal is one line naming the store and the first offending image.
"""
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.disk_space import preallocate, reporting_no_space
from utils.identity import (CODES, CODES_HASH, CODES_STAT, MANIFEST, MAX_CODE, llamagen_folders, note,
                            numbered_files, record_file, write_json_atomic)

LABELS = "labels.npy"
FORMAT_VERSION = 1
MAX_CODEBOOK_SIZE = 65536  # codes are stored as uint16
REQUIRED_KEYS = ("image_size", "grid_height", "grid_width", "codebook_size", "num_views", "count",
                 "tokenizer_hash")
LLAMAGEN_SCAN_NOTE = 100_000  # files above which the scan of LlamaGen's layout says that it runs
SCAN_ON_OPEN_BYTES = 1 << 30  # codes.npy up to this size is scanned on every open
SCAN_CHUNK_BYTES = 1 << 26  # codes read per step of a scan


def check_codebook_fits(codebook_size: int) -> None:
    """ValueError unless codebook_size codes fit the store's uint16."""
    if not 1 <= codebook_size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"codebook size {codebook_size} does not fit the code store's uint16 codes "
                         f"(1..{MAX_CODEBOOK_SIZE})")


def _images_per_step(codes: Any, chunk_bytes: int) -> int:
    per_image = max(1, int(np.prod(codes.shape[1:])) * np.dtype(codes.dtype).itemsize)
    return max(1, chunk_bytes // per_image)


def first_code_outside(codes: Any, codebook_size: int, chunk_bytes: int = SCAN_CHUNK_BYTES) -> tuple[int, int] | None:
    """(index, offending code) of the first image of codes (N, ...) holding a code outside
    0..codebook_size-1, or None; reads codes in chunks of whole images."""
    step = _images_per_step(codes, chunk_bytes)
    for start in range(0, codes.shape[0], step):
        block = np.asarray(codes[start:start + step])
        block = block.reshape(len(block), -1)  # (b, views * T)
        if not block.size or (block.max() < codebook_size and block.min() >= 0):
            continue
        bad = (block >= codebook_size) | (block < 0)  # (b, views * T)
        row = int(np.flatnonzero(bad.any(1))[0])
        return start + row, int(block[row][bad[row]][0])
    return None


def max_stored_code(codes: Any, chunk_bytes: int = SCAN_CHUNK_BYTES) -> int:
    """Largest code in codes (N, ...), read in chunks; -1 when there is none."""
    step = _images_per_step(codes, chunk_bytes)
    maxima = (np.asarray(codes[s:s + step]) for s in range(0, codes.shape[0], step))
    return max((int(block.max()) for block in maxima if block.size), default=-1)


def code_outside_message(store: str | Path, image: int, code: int, codebook_size: int) -> str:
    return (f"code store {store}: image {image} holds code {code}, outside the codebook 0..{codebook_size - 1}; "
            f"re-extract it with a tokenizer of codebook size {codebook_size}")


class CodeStoreWriter:
    """Preallocated codes.npy / labels.npy that one or several processes fill in disjoint
    slices. Rank 0 calls create() (before a barrier), the others open() (after it); every
    rank write()s its own indices and flush()es; rank 0 finally calls finalize().

    The files' blocks are reserved when they are created (utils.disk_space): a full disk stops
    create() with one line instead of a SIGBUS in the middle of the extraction. Given a
    codebook_size, write() refuses codes outside it (naming the image)."""

    def __init__(self, path: str | Path, codes: np.ndarray, labels: np.ndarray, codebook_size: int | None = None):
        self.path = Path(path)
        self.codes = codes  # (N, views, T) uint16 memmap
        self.labels = labels  # (N,) int64 memmap
        self.codebook_size = codebook_size

    @classmethod
    def create(cls, path: str | Path, count: int, num_views: int, seq_len: int,
               codebook_size: int | None = None) -> "CodeStoreWriter":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # the store is incomplete until finalize()
        codes = _create_memmap(path / CODES, np.uint16, (count, num_views, seq_len))
        labels = _create_memmap(path / LABELS, np.int64, (count,))
        return cls(path, codes, labels, codebook_size)

    @classmethod
    def open(cls, path: str | Path, codebook_size: int | None = None) -> "CodeStoreWriter":
        path = Path(path)
        return cls(path, np.load(path / CODES, mmap_mode="r+"), np.load(path / LABELS, mmap_mode="r+"), codebook_size)

    def write(self, indices: np.ndarray, codes: np.ndarray, labels: np.ndarray) -> None:
        """Store codes (B, views, T) and labels (B,) at rows `indices` (B,)."""
        codes = np.asarray(codes)
        if codes.shape[1:] != self.codes.shape[1:]:
            raise ValueError(f"codes of shape {codes.shape[1:]} per image do not fit the store's "
                             f"{self.codes.shape[1:]}")
        if codes.size and (codes.min() < 0 or codes.max() > MAX_CODEBOOK_SIZE - 1):
            raise ValueError(f"codes outside 0..{MAX_CODEBOOK_SIZE - 1} cannot be stored as uint16")
        outside = None if self.codebook_size is None else first_code_outside(codes, self.codebook_size)
        if outside is not None:
            row, code = outside
            raise ValueError(code_outside_message(self.path, int(np.asarray(indices)[row]), code, self.codebook_size))
        self.codes[indices] = codes.astype(np.uint16)
        self.labels[indices] = np.asarray(labels, dtype=np.int64)

    def flush(self) -> None:
        with reporting_no_space(self.path / CODES, self.codes.nbytes + self.labels.nbytes):
            self.codes.flush()
            self.labels.flush()

    def finalize(self, manifest: dict[str, Any], keep: np.ndarray | None = None) -> dict[str, Any]:
        """Drop the rows where keep (N,) bool is False (unreadable images), hash codes.npy once,
        then write the manifest (count = rows kept, codes_sha256, codes_stat). Returns it."""
        self.flush()
        if keep is not None and not keep.all():
            self._compact(np.flatnonzero(keep))
        manifest = {**manifest, "format_version": FORMAT_VERSION, "count": int(self.codes.shape[0])}
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise ValueError(f"manifest lacks {', '.join(missing)}")
        check_codebook_fits(manifest["codebook_size"])
        if (manifest["num_views"], manifest["grid_height"] * manifest["grid_width"]) != self.codes.shape[1:]:
            raise ValueError(f"manifest views/grid do not match codes of shape {self.codes.shape}")
        max_code = max_stored_code(self.codes)
        if max_code >= manifest["codebook_size"]:
            outside = first_code_outside(self.codes, manifest["codebook_size"])
            raise ValueError(code_outside_message(self.path, *outside, manifest["codebook_size"]))
        codes = record_file(self.path / CODES)
        manifest.update({CODES_HASH: codes["sha256"], CODES_STAT: codes["stat"], MAX_CODE: max_code})
        with reporting_no_space(self.path / MANIFEST, 1 << 16):
            write_json_atomic(self.path / MANIFEST, manifest)  # atomic: readers never see half of it
        return manifest

    def _compact(self, rows: np.ndarray, chunk: int = 65536) -> None:
        """Rewrite codes.npy / labels.npy with only `rows` (ascending), via temporary files."""
        codes = _create_memmap(self.path / (CODES + ".tmp"), np.uint16, (len(rows), *self.codes.shape[1:]))
        labels = _create_memmap(self.path / (LABELS + ".tmp"), np.int64, (len(rows),))
        for start in range(0, len(rows), chunk):
            sel = rows[start:start + chunk]
            codes[start:start + len(sel)] = self.codes[sel]
            labels[start:start + len(sel)] = self.labels[sel]
        codes.flush()
        labels.flush()
        del self.codes, self.labels
        os.replace(self.path / (CODES + ".tmp"), self.path / CODES)
        os.replace(self.path / (LABELS + ".tmp"), self.path / LABELS)
        self.codes, self.labels = codes, labels


def _create_memmap(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file of this dtype and shape, memory-mapped for writing, with its blocks
    reserved (NoSpaceError, one line, when the disk cannot hold it)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with reporting_no_space(path, nbytes):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        preallocate(path)
    return array


class PerFileArray:
    """Read-only array-like over files folder/<i>.npy, i = 0..N-1, each holding one item of
    item_shape (a leading axis of 1, as LlamaGen writes, is dropped). Loads files on access."""

    def __init__(self, folder: Path, count: int, item_shape: tuple[int, ...], dtype: np.dtype):
        self.folder = folder
        self.shape = (count, *item_shape)
        self.dtype = dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _load(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return np.load(self.folder / f"{i}.npy").reshape(self.shape[1:]).astype(self.dtype, copy=False)

    def __getitem__(self, key: Any) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            item = self._load(i)
        else:
            item = np.stack([self._load(int(i)) for i in np.arange(len(self))[key]])
            rest = (slice(None), *rest)
        return item[rest] if rest else item

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out.astype(dtype, copy=False) if dtype is not None else out


@dataclass
class CodeStore:
    """An opened code store: codes (N, views, T) and labels (N,) are memory-mapped (or
    per-file lazy for LlamaGen's layout); manifest holds the facts about the data."""
    path: Path
    codes: np.ndarray | PerFileArray
    labels: np.ndarray | PerFileArray
    manifest: dict[str, Any]
    layout: str  # "dpar" (manifest + codes.npy) or "llamagen" (per-file)

    def __len__(self) -> int:
        return self.codes.shape[0]

    @property
    def num_views(self) -> int:
        return self.codes.shape[1]

    @property
    def seq_len(self) -> int:
        return self.codes.shape[2]

    @property
    def grid_height(self) -> int:
        return self.manifest["grid_height"]

    @property
    def grid_width(self) -> int:
        return self.manifest["grid_width"]

    @property
    def grid(self) -> tuple[int, int]:
        return self.grid_height, self.grid_width

    @property
    def codebook_size(self) -> int:
        return self.manifest["codebook_size"]

    @property
    def image_size(self) -> int | None:
        return self.manifest.get("image_size")


def _open_dpar(path: Path, codebook_size: int | None) -> CodeStore:
    manifest = json.loads((path / MANIFEST).read_text())
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"code store {path}: manifest lacks {', '.join(missing)}")
    codes = np.load(path / CODES, mmap_mode="r")
    labels = np.load(path / LABELS, mmap_mode="r")
    expected = (manifest["count"], manifest["num_views"], manifest["grid_height"] * manifest["grid_width"])
    if codes.dtype != np.uint16 or codes.shape != expected:
        raise ValueError(f"code store {path}: codes.npy is {codes.dtype} {codes.shape}, "
                         f"manifest says uint16 {expected}")
    if labels.shape != (manifest["count"],):
        raise ValueError(f"code store {path}: labels.npy has shape {labels.shape}, expected ({manifest['count']},)")
    if codebook_size is not None and codebook_size != manifest["codebook_size"]:
        raise ValueError(f"code store {path} has codebook size {manifest['codebook_size']}, not {codebook_size}")
    _check_codes_in_codebook(path, codes, manifest)
    return CodeStore(path, codes, labels, manifest, "dpar")


def _check_codes_in_codebook(path: Path, codes: np.ndarray, manifest: dict[str, Any]) -> None:
    """ValueError (one line, naming the first offending image) when codes.npy holds a code outside
    the manifest's codebook: from the recorded max_code, and by a chunked scan when none is
    recorded or the file is small enough to scan on every open."""
    codebook_size = int(manifest["codebook_size"])
    recorded = manifest.get(MAX_CODE)
    if recorded is not None and int(recorded) < codebook_size and codes.nbytes > SCAN_ON_OPEN_BYTES:
        return
    if max_stored_code(codes) >= codebook_size:
        raise ValueError(code_outside_message(path, *first_code_outside(codes, codebook_size), codebook_size))
    if recorded is not None and int(recorded) >= codebook_size:
        raise ValueError(f"code store {path}: manifest.json records code {recorded}, outside the codebook "
                         f"0..{codebook_size - 1}; re-extract the code store")


def _open_llamagen(path: Path, codebook_size: int | None) -> CodeStore:
    name, codes_dir, labels_dir = llamagen_folders(path)
    if codebook_size is None:
        raise ValueError(f"code store {path} has LlamaGen's layout (no manifest): give its codebook size")
    check_codebook_fits(codebook_size)
    count = numbered_files(codes_dir)
    if numbered_files(labels_dir) != count:
        raise ValueError(f"{path}: {codes_dir.name} and {labels_dir.name} hold different numbers of files")
    first = np.load(codes_dir / "0.npy")
    if first.ndim != 3 or first.shape[0] != 1:
        raise ValueError(f"{codes_dir / '0.npy'} has shape {first.shape}, expected (1, views, T)")
    num_views, seq_len = first.shape[1:]
    side = int(round(seq_len ** 0.5))
    if side * side != seq_len:
        raise ValueError(f"{path}: {seq_len} tokens per view is not a square grid")
    size_match = re.search(r"(\d+)$", name)
    manifest = {
        "layout": "llamagen", "name": name,
        "image_size": int(size_match.group(1)) if size_match else None,
        "grid_height": side, "grid_width": side, "codebook_size": codebook_size,
        "num_views": num_views, "count": count, "tokenizer_hash": None,
    }
    codes = PerFileArray(codes_dir, count, (num_views, seq_len), first.dtype)
    labels = PerFileArray(labels_dir, count, (), np.dtype(np.int64))
    if count > LLAMAGEN_SCAN_NOTE:
        note(f"code store {path} has LlamaGen's layout: reading its {count} code files once for codes outside the "
             f"codebook (a store extracted by extract_codes.py records its largest code instead)")
    outside = _llamagen_first_code_outside(codes_dir, count, codebook_size)
    if outside is not None:
        raise ValueError(code_outside_message(path, *outside, codebook_size) + f" ({codes_dir.name}/{outside[0]}.npy)")
    return CodeStore(path, codes, labels, manifest, "llamagen")


def _llamagen_first_code_outside(folder: Path, count: int, codebook_size: int) -> tuple[int, int] | None:
    """(index, offending code) of the first file folder/<i>.npy holding a code outside
    0..codebook_size-1, or None. Each file is read once; a file whose bytes start with file 0's
    .npy header (same dtype, shape and order) is read as its data, any other through np.load."""
    reference = np.load(folder / "0.npy")
    raw = (folder / "0.npy").read_bytes()
    header = raw[:len(raw) - reference.nbytes]
    for i in range(count):
        raw = (folder / f"{i}.npy").read_bytes()
        if len(raw) == len(header) + reference.nbytes and raw.startswith(header):
            codes = np.frombuffer(raw, dtype=reference.dtype, offset=len(header))  # (views * T,)
        else:
            codes = np.load(folder / f"{i}.npy").ravel()
        if codes.size and (codes.max() >= codebook_size or codes.min() < 0):
            return i, int(codes[(codes >= codebook_size) | (codes < 0)][0])
    return None


def open_code_store(path: str | Path, codebook_size: int | None = None) -> CodeStore:
    """Open a code store (this project's layout, or LlamaGen's per-file layout, for which
    codebook_size is required). ValueError with one line when the store is incomplete,
    inconsistent, or not a code store."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"code store not found: {path}")
    if (path / MANIFEST).is_file():
        return _open_dpar(path, codebook_size)
    if (path / CODES).exists():
        raise ValueError(f"code store {path} is incomplete (no {MANIFEST}; extraction did not finish)")
    return _open_llamagen(path, codebook_size)


def check_code_store(store: CodeStore, codebook_size: int | None = None,
                     grid: int | tuple[int, int] | None = None) -> None:
    """ValueError (one line) unless the store was made with this codebook size and grid."""
    if codebook_size is not None and store.codebook_size != codebook_size:
        raise ValueError(f"code store {store.path} has codebook size {store.codebook_size}, "
                         f"but the model expects {codebook_size}")
    if grid is not None:
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if store.grid != grid:
            raise ValueError(f"code store {store.path} has a {store.grid_height}x{store.grid_width} token grid, "
                             f"but the model expects {grid[0]}x{grid[1]}")


def advise_random_access(array: Any) -> None:
    """Tell the kernel that a memory-mapped array (np.memmap) is read at random: a read then
    faults in its own pages only, not the read-around of 128 KB or more that a sequential read
    wants. For a shuffled epoch over a store larger than the page cache, read-around makes
    each item cost tens of pages of disk reads. Arrays that are not memory-mapped are left alone."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)


def item_pages(array: np.memmap, items: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) in the array's mapping of the pages that hold each item; items (K, d)
    index the first d axes of the memory-mapped array (e.g. (image, view) of codes (N, views, T)).
    Starts are page-aligned and distinct."""
    d = items.shape[1]
    item_bytes = array.strides[d - 1]
    # np.memmap maps the file from the allocation-granular start below the data offset
    first = array.offset % mmap.ALLOCATIONGRANULARITY + items.astype(np.int64) @ np.asarray(array.strides[:d])
    page = mmap.PAGESIZE
    size = len(array.base)
    return [(start, min(item_bytes + page, size - start)) for start in np.unique(first // page * page).tolist()]


def prefetch_items(array: Any, items: np.ndarray) -> None:
    """Ask the kernel to start reading items (K, d) of a memory-mapped array now (MADV_WILLNEED
    queues the reads and returns), so that a batch's reads wait on the disk once instead of once
    per item. Arrays that are not a whole memory-mapped file (np.load(mmap_mode="r")) are left alone."""
    if not isinstance(getattr(array, "base", None), mmap.mmap) or not hasattr(mmap, "MADV_WILLNEED") or not len(items):
        return
    for start, length in item_pages(array, items):
        array.base.madvise(mmap.MADV_WILLNEED, start, length)


class CodeDataset(Dataset):
    """Item i: (codes (T,) int64 of one augmented view, label () int64[, entropy (T,) float32
    of the same view]). The view is drawn from (seed, epoch, i) alone, so a run is
    reproducible and resumes mid-epoch exactly; call set_epoch() each epoch (DataLoader
    workers copy the dataset when they start: use persistent_workers=False). With one
    view it is always view 0. entropies: (N, views, T) float16, aligned with the codes.
    Memory-mapped codes and entropies are advised for random access (the items are)."""

    def __init__(self, store: CodeStore, seed: int = 0, entropies: np.ndarray | None = None):
        if entropies is not None and tuple(entropies.shape) != tuple(store.codes.shape):
            raise ValueError(f"entropies of shape {tuple(entropies.shape)} do not match codes "
                             f"of shape {tuple(store.codes.shape)}")
        self.store = store
        self.seed = seed
        self.entropies = entropies
        self.epoch = 0
        advise_random_access(store.codes)
        advise_random_access(entropies)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def view_index(self, index: int) -> int:
        if self.store.num_views == 1:
            return 0
        return int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.store.num_views))

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """The items of one batch (the DataLoader's batched fetch): their reads from the
        memory-mapped store are started together (prefetch_items), then read as __getitem__ does."""
        rows = np.asarray(indices, dtype=np.int64)
        views = np.array([self.view_index(i) for i in indices], dtype=np.int64)
        items = np.stack([rows, views], axis=1)  # (K, 2)
        for array in (self.store.codes, self.entropies):
            prefetch_items(array, items)
        return [self.item(int(i), int(v)) for i, v in zip(rows, views)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.item(index, self.view_index(index))

    def item(self, index: int, view: int) -> tuple[torch.Tensor, ...]:
        codes = torch.from_numpy(np.array(self.store.codes[index][view], dtype=np.int64))  # (T,)
        label = torch.tensor(int(self.store.labels[index]), dtype=torch.int64)
        if self.entropies is None:
            return codes, label
        entropy = torch.from_numpy(np.array(self.entropies[index][view], dtype=np.float32))  # (T,)
        return codes, label, entropy
