"""FID mode: N class-balanced images, one PNG each, packed into the ADM evaluator's .npz.

Image i has class i mod num_classes and seed image_seed(seed, i). The indices are cut into
fixed chunks of --per-proc-batch-size consecutive indices and the chunks are dealt to the
ranks in turn, so every image is generated in the same batch whatever the number of
processes (the same bytes on the same hardware). Each image is written as
DIR/{i:06d}.png through a temporary file and an atomic rename, with its class, seed and patch
count (DPAR) in PNG text chunks. A rerun generates only the missing indices, so an
interrupted run finishes without generating any image twice; DIR/sampling.json records the
settings that decide the images, the generator, VQ and entropy model by content (SHA-256 of the
checkpoint file, or of every file of an FSDP directory), and a rerun with another checkpoint or
other settings stops in one line (a larger N may extend a folder).

An interrupt (Ctrl-C) or a full disk ends the run with one line saying how many images are
finished; rerunning the same command continues from there.

At the end rank 0 checks that all N images exist and writes
  DIR.npz   arr_0 uint8 (N, H, W, 3) at --image-size-eval (the ADM format), and
            arr_1 int64 (N,) class labels (guided-diffusion's convention for labelled samples);
  DIR.json  images/s and tokens/s of this run's generation (all ranks together: images over
            the slowest rank's generation time), mean patches per image over all N (DPAR).
"""
import errno
import json
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from autoregressive.sample.loading import is_release
from autoregressive.sample.sampler import Sampler, Throughput, format_throughput, image_seed, to_uint8
from autoregressive.sample.settings import SampleRun
from utils.identity import checkpoint_sha256, file_sha256
from utils.distributed import DistInfo, all_reduce, barrier, broadcast_object
from utils.release import WEIGHTS_NAME, local_folder

SETTINGS_FILE = "sampling.json"
PNG_NAME = re.compile(r"(\d{6,})\.png")
READ_CHUNK = 1024


def default_sample_dir(cfg: SampleRun) -> str:
    """LlamaGen's folder naming, under samples/."""
    ckpt = Path(cfg.gpt_ckpt.rstrip("/")).stem
    return (f"samples/{cfg.gpt_model}-{ckpt}-size-{cfg.image_size}-size-{cfg.image_size_eval}-{cfg.vq_model}-"
            f"topk-{cfg.top_k}-topp-{cfg.top_p}-temperature-{cfg.temperature}-cfg-{cfg.cfg_scale}-seed-{cfg.seed}")


class Interrupted(Exception):
    """Ctrl-C during FID sampling, as one line: how many images are finished and that a rerun
    continues."""


class DiskFull(Exception):
    """A write that failed for lack of space (ENOSPC); `path` is the file being written."""

    def __init__(self, path: Path):
        super().__init__(f"no space left on device while writing {path}")
        self.path = path


def write_atomically(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside `final` (.NAME.tmpPID), then rename it to `final`:
    readers never see half a file. A failed or interrupted write removes the temporary file;
    a full disk (ENOSPC) raises DiskFull naming `final`."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise DiskFull(final) from e
        raise


def checkpoint_identity(path: str) -> str:
    """SHA-256 naming a checkpoint by content: of a release folder's (or hub repo's)
    model.safetensors, else utils.identity.checkpoint_sha256 (a file, or every file of an FSDP
    directory)."""
    if is_release(path):
        return file_sha256(local_folder(path) / WEIGHTS_NAME)
    return checkpoint_sha256(path)


def run_settings(cfg: SampleRun) -> dict:
    """Everything that decides the images of a folder (not N, the batch size or the ranks); the
    checkpoints by content (checkpoint_identity), so a checkpoint retrained or
    replaced at the same path is another one."""
    return {
        "gpt_model": cfg.gpt_model, "gpt_ckpt_sha256": checkpoint_identity(cfg.gpt_ckpt),
        "vq_model": cfg.vq_model, "vq_ckpt_sha256": checkpoint_identity(cfg.vq_ckpt),
        "entropy_ckpt_sha256": checkpoint_identity(cfg.entropy_ckpt) if cfg.entropy_ckpt else None,
        "image_size": cfg.image_size, "image_size_eval": cfg.image_size_eval,
        "cfg_scale": cfg.cfg_scale, "cfg_interval": cfg.cfg_interval, "temperature": cfg.temperature,
        "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "precision": cfg.precision,
        "patching": cfg.patching, "weights": cfg.weights,
    }


def _shown(key: str, value: object) -> str:
    """A recorded value for a one-line message (hashes shortened to 12 hex digits)."""
    if key.endswith("sha256") and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return repr(value)


FOLDER_REMEDY = "use a new --sample-dir or remove the folder"


def check_settings(sample_dir: Path, settings: dict) -> None:
    """Record the settings in a new folder; refuse a folder made with other settings, or one
    that holds images without a record of what made them."""
    path = sample_dir / SETTINGS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if differ:
            k = differ[0]
            raise ValueError(f"{sample_dir} holds images made with {k} {_shown(k, stored.get(k))}, not "
                             f"{_shown(k, settings.get(k))} as in this run; {FOLDER_REMEDY}")
        return
    if any(PNG_NAME.fullmatch(entry.name) for entry in os.scandir(sample_dir)):
        raise ValueError(f"{sample_dir} holds images but no {SETTINGS_FILE} saying what made them; {FOLDER_REMEDY}")
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=2)))


def existing_indices(sample_dir: Path, n: int) -> set:
    """Indices < n with a finished PNG (temporary files of an interrupted run are removed)."""
    done = set()
    for entry in os.scandir(sample_dir):
        if entry.name.startswith(".") and ".tmp" in entry.name:
            os.remove(entry.path)
        elif (m := PNG_NAME.fullmatch(entry.name)) and int(m.group(1)) < n:
            done.add(int(m.group(1)))
    return done


def finished_images(sample_dir: Path, n: int) -> int:
    """How many of images 0..n-1 have a finished PNG (read only: no temporary file is removed)."""
    if not sample_dir.is_dir():
        return 0
    return sum(1 for entry in os.scandir(sample_dir) if (m := PNG_NAME.fullmatch(entry.name)) and int(m.group(1)) < n)


def png_path(sample_dir: Path, index: int) -> Path:
    return sample_dir / f"{index:06d}.png"


def write_png(sample_dir: Path, index: int, pixels: np.ndarray, meta: Dict[str, int]) -> None:
    """pixels (H, W, 3) uint8 -> DIR/{index:06d}.png via a temporary file and os.replace."""
    info = PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    image = Image.fromarray(pixels)
    write_atomically(png_path(sample_dir, index), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def plan_chunks(missing: Sequence[int], chunk_size: int, rank: int, world: int) -> List[List[int]]:
    """This rank's batches: missing indices grouped by their fixed chunk i // chunk_size,
    non-empty chunks dealt to the ranks in turn."""
    chunks: Dict[int, List[int]] = {}
    for i in missing:
        chunks.setdefault(i // chunk_size, []).append(i)
    ordered = [chunks[k] for k in sorted(chunks)]
    return ordered[rank::world]


def generate_missing(cfg: SampleRun, sampler: Sampler, sample_dir: Path, missing: Sequence[int],
                     info: DistInfo) -> Tuple[Throughput, float]:
    """Generate and write this rank's share of the missing images; returns the generation
    counts and the wall-clock seconds of the whole loop (VQ decoding and PNG writing included)."""
    C, throughput = sampler.num_classes, Throughput()
    start = time.perf_counter()
    plan = plan_chunks(missing, cfg.per_proc_batch_size, info.rank, info.world_size)
    for chunk in tqdm(plan, disable=not info.is_main, desc=f"sampling ({info.world_size} ranks)", unit="batch"):
        seeds = [image_seed(cfg.seed, i) for i in chunk]
        batch = sampler.sample([i % C for i in chunk], seeds)
        throughput.add(batch)
        pixels = to_uint8(batch.images, cfg.image_size_eval)  # (B, H, W, 3)
        for j, i in enumerate(chunk):
            meta = {"index": i, "class": i % C, "seed": seeds[j]}
            if batch.num_patches is not None:
                meta["patches"] = int(batch.num_patches[j])
            write_png(sample_dir, i, pixels[j], meta)
    return throughput, time.perf_counter() - start


def format_waiting(run: dict) -> str:
    """The time the user waited for this run's images, split into token generation and VQ
    decoding plus writing, then the generation-only rates."""
    if not run["images"]:
        return "no images generated"
    return (f"{run['images']} images in {run['wall_seconds']:.1f} s ({run['images'] / run['wall_seconds']:.2f} "
            f"images/s): generation {run['generation_seconds']:.1f} s, VQ decoding and writing "
            f"{run['decode_and_write_seconds']:.1f} s; generation alone: {format_throughput(run)}")


def _read_png(path: Path) -> Tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB")), dict(im.text)


def pack_npz(sample_dir: Path, n: int, num_classes: int, size: int, workers: int = 8) -> Tuple[Path, dict]:
    """Stream DIR/000000.png.. into DIR.npz (arr_0 (n, size, size, 3) uint8, arr_1 (n,) int64
    labels) without holding all images in memory; returns the path and the PNGs' metadata
    summary (mean patches per image when recorded)."""
    npz = Path(str(sample_dir).rstrip("/") + ".npz")
    labels = np.arange(n, dtype=np.int64) % num_classes
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (n, size, size, 3)}
    patches: List[int] = []

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf, \
                ThreadPoolExecutor(workers) as pool:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for start in range(0, n, READ_CHUNK):
                    indices = range(start, min(start + READ_CHUNK, n))
                    paths = [png_path(sample_dir, i) for i in indices]
                    for i, path, (pixels, meta) in zip(indices, paths, pool.map(_read_png, paths)):
                        if pixels.shape != (size, size, 3):
                            raise ValueError(f"{path} is {pixels.shape}, expected ({size}, {size}, 3)")
                        if "class" in meta and int(meta["class"]) != labels[i]:
                            raise ValueError(f"{path} holds class {meta['class']}, expected {labels[i]}")
                        if "patches" in meta:
                            patches.append(int(meta["patches"]))
                        f.write(np.ascontiguousarray(pixels).tobytes())
            with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)

    write_atomically(npz, write)
    summary = {"mean_patches_per_image": float(np.mean(patches))} if len(patches) == n else {}
    return npz, summary


def _prepare(cfg: SampleRun, sample_dir: Path, info: DistInfo) -> List[int]:
    """Rank 0 checks the folder and lists the missing indices; every rank gets the list (or
    the same error)."""
    plan: Tuple[str, object] = ("ok", None)
    if info.is_main:
        try:
            sample_dir.mkdir(parents=True, exist_ok=True)
            check_settings(sample_dir, run_settings(cfg))
            done = existing_indices(sample_dir, cfg.num_fid_samples)
            plan = ("ok", [i for i in range(cfg.num_fid_samples) if i not in done])
        except DiskFull as e:
            plan = ("error", disk_full_message(e, sample_dir, cfg.num_fid_samples))
        except (ValueError, OSError) as e:
            plan = ("error", str(e))
    status, value = broadcast_object(plan)
    if status == "error":
        raise ValueError(value)
    return value


def disk_full_message(error: DiskFull, sample_dir: Path, n: int) -> str:
    return (f"{error}: free space and rerun; the run continues from {finished_images(sample_dir, n)} images")


def run_fid(cfg: SampleRun, sampler: Sampler, info: DistInfo) -> Optional[dict]:
    """Generate the missing images on every rank, then (rank 0) pack DIR.npz and write DIR.json.
    Returns the statistics on rank 0, None elsewhere. Ctrl-C raises Interrupted and a full disk
    ValueError, each one line with the number of finished images."""
    sample_dir = Path(cfg.sample_dir or default_sample_dir(cfg))
    n = cfg.num_fid_samples
    try:
        return _sample_and_pack(cfg, sampler, info, sample_dir)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {finished_images(sample_dir, n)} of {n} images; rerun the same "
                          f"command to continue") from None
    except DiskFull as e:
        raise ValueError(disk_full_message(e, sample_dir, n)) from e


def _sample_and_pack(cfg: SampleRun, sampler: Sampler, info: DistInfo, sample_dir: Path) -> Optional[dict]:
    n = cfg.num_fid_samples
    missing = _prepare(cfg, sample_dir, info)
    if info.is_main:
        print(f"{sample_dir}: {n - len(missing)} of {n} images present, generating {len(missing)} "
              f"on {info.world_size} process(es)")
    throughput, wall = generate_missing(cfg, sampler, sample_dir, missing, info)

    counts = [throughput.images, throughput.tokens, throughput.patches]
    totals = torch.tensor(counts, dtype=torch.float64, device=info.device)  # NCCL reduces CUDA tensors
    seconds = torch.tensor([throughput.seconds, wall], dtype=torch.float64, device=info.device)
    all_reduce(totals, "sum")
    all_reduce(seconds, "max")  # the slowest rank bounds the run
    barrier()
    if not info.is_main:
        return None
    totals, (seconds, wall) = totals.tolist(), seconds.tolist()
    run = Throughput(int(totals[0]), int(totals[1]), int(totals[2]), seconds).summary(sampler.patched)
    run["wall_seconds"] = wall
    run["decode_and_write_seconds"] = max(0.0, wall - seconds)
    absent = [i for i in range(n) if not png_path(sample_dir, i).is_file()]
    if absent:
        raise ValueError(f"{len(absent)} of {n} images are missing in {sample_dir} (first {absent[0]}); "
                         f"rerun to finish")
    npz, stored = pack_npz(sample_dir, n, sampler.num_classes, cfg.image_size_eval)
    stats = {
        "npz": str(npz), "num_images": n, "image_size": cfg.image_size, "image_size_eval": cfg.image_size_eval,
        "num_classes": sampler.num_classes, "labels_key": "arr_1", "world_size": info.world_size,
        "per_proc_batch_size": cfg.per_proc_batch_size, "this_run": run, **stored,
        "settings": json.loads((sample_dir / SETTINGS_FILE).read_text()),
    }
    if "mean_patches_per_image" in stored:
        stats["compression"] = sampler.num_tokens / stored["mean_patches_per_image"]
    json_path = npz.with_suffix(".json")
    write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(stats, indent=2)))
    print(f"this run: {format_waiting(run)}")
    size = cfg.image_size_eval
    print(f"wrote {npz} ({n} x {size} x {size} x 3 uint8, labels arr_1) and {json_path}")
    return stats
