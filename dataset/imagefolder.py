"""ImageFolder datasets (root/<class>/<image>) for tokenizer training and code extraction.

Classes, labels and sample order follow torchvision's ImageFolder rules (sorted class folder
names; files walked recursively in sorted order, filtered by extension), so labels agree with
any other tool reading the same folder. torchvision itself is not imported: it is slow to load.
"""
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.augmentation import center_crop_arr, random_crop_arr

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for unreadable, truncated or hostile files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of an ImageFolder; ValueError with one line when the
    folder is missing, has no class folders, or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if f.lower().endswith(IMG_EXTENSIONS)]
    if not samples:
        raise ValueError(f"no images in the class folders of {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (so truncated files fail here) and convert it to RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (LlamaGen's ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(pil_image, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
    return x * 2.0 - 1.0


def image_transform(image_size: int, random_crop: bool = False,
                    flip: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform: center (or random, 0.8-1.0 of the short side) crop to image_size,
    optional random horizontal flip, -> (3, image_size, image_size) in [-1, 1]."""
    def transform(pil_image: Image.Image) -> torch.Tensor:
        if random_crop:
            pil_image = random_crop_arr(pil_image, image_size)
        else:
            pil_image = center_crop_arr(pil_image, image_size)
        x = to_tensor(pil_image)
        if flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x
    return transform


class ImageFolderDataset(Dataset):
    """Items (transform(image), label, index); an unreadable image raises."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor]):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def relative_path(self, index: int) -> str:
        return Path(self.samples[index][0]).relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label, index


class CheckedImageFolderDataset(ImageFolderDataset):
    """Items (transform(image), label, index, error): error is "" for a good image; for an
    unreadable one it is the reason, and the tensor is a placeholder of the right shape that
    callers must drop."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except IMAGE_ERRORS as e:
            placeholder = self.transform(Image.new("RGB", (32, 32)))
            return placeholder, label, index, f"{type(e).__name__}: {e}"
        return self.transform(image), label, index, ""
