"""Pixels of the images a code store was made from: the source file of each stored image and
its view as extract_codes.py cropped it, and decoded images as uint8 arrays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dataset.augmentation import center_crop_arr, ten_crops
from dataset.code_store import CodeStore
from dataset.imagefolder import list_image_folder, load_rgb, to_tensor


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def store_image_paths(store: CodeStore, data_path: str | Path) -> list[str]:
    """Source file of each stored image: the ImageFolder's images in torchvision's order minus
    those the manifest records as skipped; ValueError (one line) if the folder does not match."""
    manifest = store.manifest
    if "source_count" not in manifest or "skipped" not in manifest:
        raise ValueError(f"code store {store.path} records no image order; drop --data-path to show decoded codes")
    _, samples = list_image_folder(data_path)
    if len(samples) != manifest["source_count"]:
        raise ValueError(f"{data_path} holds {len(samples)} images but {store.path} was made from "
                         f"{manifest['source_count']}")
    skipped = {int(s["index"]) for s in manifest["skipped"]}
    kept = [(p, label) for i, (p, label) in enumerate(samples) if i not in skipped]
    labels = np.asarray(store.labels)
    if len(kept) != len(labels) or any(label != int(labels[i]) for i, (_, label) in enumerate(kept)):
        raise ValueError(f"the images of {data_path} do not match the labels of {store.path}")
    return [p for p, _ in kept]


def stored_view_pixels(path: str | Path, manifest: dict, view: int) -> np.ndarray:
    """(S, S, 3) uint8: view `view` of an image as extract_codes.py made it (manifest
    "image_size", "views", "augmentation": center crop, its flip, or ten-crop)."""
    size = manifest["image_size"]
    augmentation = manifest.get("augmentation") or {}
    image = load_rgb(path)
    if augmentation.get("ten_crop"):
        x = to_tensor(center_crop_arr(image, int(size * augmentation["crop_range"])))  # (3, C, C)
        return to_uint8_images(ten_crops(x, size)[view][None])[0]  # (S, S, 3)
    pixels = np.asarray(center_crop_arr(image, size))  # (S, S, 3)
    return np.ascontiguousarray(pixels[:, ::-1]) if manifest["views"][view].startswith("flip_") else pixels
