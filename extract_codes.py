"""Encode an ImageFolder with a VQ tokenizer into a code store (dataset/code_store.py).

    python extract_codes.py --data-path data/toy --code-path codes/toy_64 \
        --vq-model VQ-16 --vq-ckpt vq_ds16_c2i.pt --image-size 64 --flip
    torchrun --nproc_per_node 8 extract_codes.py ...   (each rank encodes a contiguous block)

Views per image, stored in this fixed order (names recorded in the manifest):
    default      [center]                  center_crop_arr to --image-size
    --flip       [center, flip_center]     plus its horizontal flip
    --ten-crop   torchvision's TenCrop of center_crop_arr(image, int(image_size * crop_range)):
                 [top_left, top_right, bottom_left, bottom_right, center, flip_top_left, ...,
                 flip_center] (flips of the mirrored image, as LlamaGen)
Unreadable images are skipped with a warning; the store holds only readable ones (in folder
order) and the manifest lists the skipped files. Images the pipeline cannot represent faithfully
(float or 32-bit pixels, a shorter side below image_size / 8: dataset/imagefolder.py) stop the
extraction before any encoding, with one line naming the first; so does an empty class folder.
The output files' blocks are reserved when the store is created: a full disk stops there with
one line ("no space left on device for ..."). An interrupted extraction leaves an incomplete
store (no manifest); rerunning the same command extracts it again from the start.
"""
import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dataset.augmentation import center_crop_arr, ten_crops
from dataset.code_store import MANIFEST, CodeStoreWriter, check_codebook_fits, first_code_outside
from dataset.imagefolder import CheckedImageFolderDataset, image_problem, list_image_folder, to_tensor
from tokenizer.vq_model import VQ_models, VQModel, load_vq_checkpoint
from utils.identity import file_sha256
from utils.cli import HelpFormatter, default_workers
from utils.disk_space import NoSpaceError
from utils.distributed import barrier, gather_objects, init_distributed, teardown_distributed

TEN_CROP_NAMES = ["top_left", "top_right", "bottom_left", "bottom_right", "center"]


@dataclass
class ExtractConfig:
    data_path: str
    code_path: str
    vq_ckpt: str
    vq_model: str = "VQ-16"
    image_size: int = 256
    ten_crop: bool = False
    crop_range: float = 1.1  # ten-crop only: crops are taken from a center crop this much larger
    flip: bool = False
    batch_size: int = 32
    num_workers: int | None = None  # None: the available cores, at most 4


def view_names(ten_crop: bool, flip: bool) -> list[str]:
    if ten_crop:
        return TEN_CROP_NAMES + [f"flip_{n}" for n in TEN_CROP_NAMES]
    return ["center", "flip_center"] if flip else ["center"]


def view_transform(image_size: int, ten_crop: bool, crop_range: float,
                   flip: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (views, 3, image_size, image_size) in [-1, 1], views as in view_names()."""
    def transform(pil_image: Image.Image) -> torch.Tensor:
        if ten_crop:
            x = to_tensor(center_crop_arr(pil_image, int(image_size * crop_range)))  # (3, C, C)
            return ten_crops(x, image_size)  # (10, 3, S, S)
        x = to_tensor(center_crop_arr(pil_image, image_size))  # (3, S, S)
        return torch.stack([x, x.flip(-1)]) if flip else x[None]
    return transform


def check_config(cfg: ExtractConfig) -> None:
    """ValueError (one line) for options that cannot work, before any heavy work."""
    if cfg.ten_crop and cfg.flip:
        raise ValueError("--ten-crop already includes flipped views; drop --flip")
    if cfg.ten_crop and cfg.crop_range < 1.0:
        raise ValueError(f"--crop-range must be >= 1, got {cfg.crop_range}")
    if cfg.image_size < 1 or cfg.batch_size < 1 or (cfg.num_workers is not None and cfg.num_workers < 0):
        raise ValueError("--image-size and --batch-size must be positive, --num-workers non-negative")
    if (Path(cfg.code_path) / MANIFEST).exists():
        raise ValueError(f"a code store already exists at {cfg.code_path}; remove it or choose another --code-path")


def load_tokenizer(cfg: ExtractConfig) -> VQModel:
    """The VQ model of cfg.vq_ckpt, checked against the image size; ValueError (one line) otherwise."""
    try:
        vq = load_vq_checkpoint(cfg.vq_ckpt, cfg.vq_model)
    except ValueError:
        raise
    except Exception as e:  # torch.load of a corrupt or foreign file fails in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read VQ checkpoint {cfg.vq_ckpt}: {first}") from None
    check_codebook_fits(vq.config.codebook_size)
    f = vq.downsample_factor
    if cfg.image_size % f:
        raise ValueError(f"--image-size {cfg.image_size} is not divisible by {cfg.vq_model}'s downsample factor {f}")
    return vq


def _encode_block(loader: DataLoader, vq: VQModel, writer: CodeStoreWriter, dataset: CheckedImageFolderDataset,
                  num_views: int, device: torch.device | str, progress: bool) -> list[dict[str, Any]]:
    """Encode the loader's images into the writer; returns the unreadable ones it skipped."""
    skipped = []
    for x, y, index, errors in tqdm(loader, desc="extract", disable=not progress, file=sys.stderr):
        # x: (B, views, 3, S, S); errors: B strings, "" for a readable image
        ok = torch.tensor([e == "" for e in errors])
        for i, e in zip(index[~ok].tolist(), [e for e in errors if e]):
            skipped.append({"index": i, "path": dataset.relative_path(i), "error": e})
            tqdm.write(f"warning: skipping unreadable image {dataset.relative_path(i)} ({e})", file=sys.stderr)
        if not ok.any():
            continue
        images = x.to(device, non_blocking=True)[ok.to(device)].flatten(0, 1)  # (b*views, 3, S, S)
        with torch.no_grad():
            codes = vq.encode_to_indices(images)  # (b*views, h, w)
        codes = codes.reshape(-1, num_views, codes.shape[1] * codes.shape[2]).cpu().numpy()  # (b, views, T)
        outside = first_code_outside(codes, vq.config.codebook_size)
        if outside is not None:
            row, code = outside
            raise ValueError(f"the tokenizer gave code {code} for image {dataset.relative_path(int(index[ok][row]))}, "
                             f"outside its codebook 0..{vq.config.codebook_size - 1}")
        writer.write(index[ok].numpy(), codes, y[ok].numpy())
    writer.flush()
    return skipped


def tokenizer_name(registry_name: str, downsample: int) -> str:
    """The registry name, qualified when the checkpoint's downsampling differs from the one the
    name states (a VQ-16 layout trained with fewer stages is not a VQ-16 tokenizer)."""
    named = registry_name.rsplit("-", 1)[-1]
    if named.isdigit() and int(named) == downsample:
        return registry_name
    return f"{registry_name} layout, downsample {downsample}"


def check_images(dataset: CheckedImageFolderDataset, indices: range, image_size: int) -> None:
    """ValueError (one line, naming the first) when images of the dataset at these indices cannot
    be represented faithfully by an image_size crop (headers only; every rank checks its block)."""
    problems = [p for i in indices if (p := image_problem(dataset.samples[i][0], image_size)) is not None]
    problems = [p for part in gather_objects(problems) for p in part]
    if problems:
        more = len(problems) - 1
        more = f" ({more} more image{'s' if more > 1 else ''} refused)" if more else ""
        raise ValueError(problems[0] + more)


def extract_codes(cfg: ExtractConfig, vq: VQModel, tokenizer_hash: str, rank: int = 0, world_size: int = 1,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Encode every readable image of cfg.data_path into the store at cfg.code_path.

    Rank r encodes the contiguous block [r*N/W, (r+1)*N/W) of the folder's images and writes
    it into the files rank 0 preallocated; rank 0 then drops unreadable rows and writes the
    manifest. With world_size > 1 the process group must be initialised (utils/distributed.py).
    Returns the manifest (on every rank)."""
    views = view_names(cfg.ten_crop, cfg.flip)
    dataset = CheckedImageFolderDataset(cfg.data_path, view_transform(cfg.image_size, cfg.ten_crop,
                                                                      cfg.crop_range, cfg.flip))
    n = len(dataset)
    grid = cfg.image_size // vq.downsample_factor
    block = range(rank * n // world_size, (rank + 1) * n // world_size)
    check_images(dataset, block, int(cfg.image_size * cfg.crop_range) if cfg.ten_crop else cfg.image_size)
    if rank == 0:
        writer = CodeStoreWriter.create(cfg.code_path, n, len(views), grid * grid, vq.config.codebook_size)
    barrier()
    if rank != 0:
        writer = CodeStoreWriter.open(cfg.code_path, vq.config.codebook_size)

    loader = DataLoader(Subset(dataset, block), batch_size=cfg.batch_size, shuffle=False,
                        num_workers=default_workers() if cfg.num_workers is None else cfg.num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    skipped = _encode_block(loader, vq.to(device).eval(), writer, dataset, len(views), device, rank == 0)
    skipped = sorted((s for part in gather_objects(skipped) for s in part), key=lambda s: s["index"])
    if len(skipped) == n:
        raise ValueError(f"none of the {n} images in {cfg.data_path} could be read")
    keep = np.ones(n, dtype=bool)
    keep[[s["index"] for s in skipped]] = False
    manifest = {
        "image_size": cfg.image_size, "grid_height": grid, "grid_width": grid,
        "codebook_size": vq.config.codebook_size, "num_views": len(views), "views": views,
        "count": int(keep.sum()), "source_count": n,
        "num_classes": len(dataset.classes), "classes": dataset.classes,
        "tokenizer": tokenizer_name(cfg.vq_model, vq.downsample_factor), "tokenizer_hash": tokenizer_hash,
        "tokenizer_checkpoint": Path(cfg.vq_ckpt).name, "downsample_factor": vq.downsample_factor,
        "augmentation": {"resize": "center_crop_arr", "ten_crop": cfg.ten_crop,
                         "crop_range": cfg.crop_range if cfg.ten_crop else None, "flip": cfg.flip},
        "data_path": str(cfg.data_path), "skipped": skipped,
    }
    barrier()  # every rank's slice is on disk
    if rank == 0:
        manifest = writer.finalize(manifest, keep)
    del writer
    barrier()  # the manifest exists when any rank returns
    return manifest


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    parser = argparse.ArgumentParser(description="Encode an ImageFolder into a VQ code store.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-path", type=str, required=True, help="ImageFolder root: <class>/<image>")
    parser.add_argument("--code-path", type=str, required=True, help="code store directory to create")
    parser.add_argument("--vq-model", type=str, choices=list(VQ_models), default="VQ-16",
                        help="tokenizer registry name")
    parser.add_argument("--vq-ckpt", type=str, required=True, help="VQ tokenizer checkpoint (ours or LlamaGen's)")
    parser.add_argument("--image-size", type=int, default=256,
                        help="images are resized and center-cropped to this size")
    parser.add_argument("--ten-crop", action="store_true", help="10 views: TenCrop of a crop-range larger center crop")
    parser.add_argument("--crop-range", type=float, default=1.1, help="ten-crop only")
    parser.add_argument("--flip", action="store_true", help="add the horizontally flipped center view")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch and process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="DataLoader workers per process (0 = in process); default: the CPU cores this "
                             "process may use, at most 4")
    return ExtractConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        check_config(cfg)
        list_image_folder(cfg.data_path)  # fails early on a missing or empty folder
        vq = load_tokenizer(cfg)
    except ValueError as e:
        raise SystemExit(f"extract_codes.py: error: {e}")
    info = init_distributed()
    try:
        tokenizer_hash = file_sha256(cfg.vq_ckpt)
        manifest = extract_codes(cfg, vq, tokenizer_hash, info.rank, info.world_size, info.device)
    except (ValueError, NoSpaceError) as e:
        raise SystemExit(f"extract_codes.py: error: {e}")
    except KeyboardInterrupt:
        print(f"extract_codes.py: interrupted; {cfg.code_path} is incomplete (no {MANIFEST}): rerun the same "
              f"command to extract it again from the start", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        teardown_distributed()
    if info.is_main:
        print(f"wrote {manifest['count']} images x {manifest['num_views']} views of "
              f"{manifest['grid_height']}x{manifest['grid_width']} codes to {cfg.code_path}"
              + (f" ({len(manifest['skipped'])} unreadable skipped)" if manifest["skipped"] else ""))


if __name__ == "__main__":
    main()
